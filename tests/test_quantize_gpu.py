"""INT8 / FP8 engines on a CUDA GPU vs PyTorch FP32 (skipped without a GPU and TensorRT, with the reason).

Builds strongly typed engines from the Q/DQ sets of `test_quantize.quantized_run` with classic
TensorRT (10.x / 11.x) and TensorRT-RTX where they support the GPU, then runs `mmgen parity`'s
checks (every component on random and real inputs, and whole sampling runs) on them with the
spec's 8-bit tolerances. FP8 needs SM >= 8.9; below that the build must be refused in one line.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_quantize import SAMPLING, quantized_run  # noqa: F401  (the shared module-scoped fixture)

from mmgen_deploy.engines.builder import BuildOptions, build_engines
from mmgen_deploy.engines.flavour import installed_flavours
from mmgen_deploy.engines.manifest import current_gpu
from mmgen_deploy.errors import UsageError
from mmgen_deploy.parity.compare import ParityOptions, run_parity
from mmgen_deploy.rundir import RunDir

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]


@pytest.mark.parametrize("runtime", ["tensorrt", "tensorrt-rtx"])
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_8_bit_engines_match_pytorch(quantized_run, tmp_path, runtime: str, precision: str) -> None:  # noqa: F811
    if runtime not in [f.runtime for f in installed_flavours()]:
        pytest.skip(f"{runtime} is not installed")
    gpu = current_gpu() if torch.cuda.is_available() else None
    assert gpu is not None
    sm = int(gpu.sm[2:])
    if runtime == "tensorrt-rtx" and sm == 90:
        pytest.skip("TensorRT-RTX has no Hopper (SM90) support")
    run, _ = quantized_run
    copy = RunDir(shutil.copytree(run.root, tmp_path / "run"))
    targets = (gpu.sm,) if runtime == "tensorrt-rtx" else ()
    options = BuildOptions(runtime=runtime, precision=precision, components=SAMPLING, compute_capabilities=targets)
    if precision == "fp8" and sm < 89:
        with pytest.raises(UsageError, match=r"8\.9"):
            build_engines(copy, options)
        return
    result = build_engines(copy, options)
    assert result.manifest["precision"] == precision
    # Only this runtime's engines exist in the copy, so the runner takes them.
    report = run_parity(copy.root, ParityOptions(backend="tensorrt", precision=precision, batches=(1, 3),
                                                 steps=10, num_images=4, components=SAMPLING))
    assert report.passed, [c.to_dict() for c in report.checks if not c.passed]
