"""Where a component's time goes inside OpenVINO: per-operation-type share of one call (PERF_COUNT).

    PYTHONPATH=$PWD python benchmarks/openvino_profile.py RUN_DIR [--component denoiser]
        [--precision bf16] [--batch 2,32] [--runs 5] [--threads N]

Compiles the run's FP32 ONNX graph of the component as `OpenVinoRunner(..., streams=1)` does (static
batch, the precision's inference hint, one infer request on every thread; the runner's default splits a
batch across two streams), runs it `--runs` times per batch and prints, per
batch, the wall time of a call and the share of the summed operation time by operation type
(FullyConnected / MatMul, Convolution, softmax-attention pieces, normalisations, element-wise, ...)
with the precision OpenVINO executed each type in. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--component", default="denoiser")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--batch", default="2,32", help="Comma-separated batch sizes of the call itself.")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=8, help="Operation types to list per batch.")
    args = parser.parse_args(argv)

    import openvino as ov

    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.runtime.openvino_runner import HINTS
    from mmgen_deploy.specs import component_specs

    run = RunDir(args.run_dir)
    spec = component_specs(run.load_config())[args.component]
    core = ov.Core()
    path = run.onnx_dir / "fp32" / f"{args.component}.onnx"
    hint = "f32" if spec.keep_fp32 else HINTS[args.precision]
    print(f"{path} on CPU, hint {hint}")
    for batch in (int(b) for b in args.batch.split(",")):
        model = core.read_model(str(path))
        model.reshape({t.name: list(t.concrete_shape(batch)) for t in spec.inputs})
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "PERF_COUNT": True}
        if args.threads:
            config["INFERENCE_NUM_THREADS"] = args.threads
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        feeds = spec.make_inputs(batch, np.random.default_rng(0))
        request.infer(feeds)  # warm-up
        by_type: dict[tuple[str, str], float] = defaultdict(float)
        walls = []
        for _ in range(args.runs):
            start = time.perf_counter()
            request.infer(feeds)
            walls.append(time.perf_counter() - start)
            for info in request.profiling_info:
                exec_type = str(info.exec_type)
                precision = exec_type.rsplit("_", 1)[-1] if "_" in exec_type else "?"
                by_type[(str(info.node_type), precision)] += info.real_time.total_seconds()
        total = sum(by_type.values())
        print(f"\nbatch {batch}: {np.median(walls) * 1e3:.2f} ms per call (median of {args.runs}); "
              f"operations sum to {total / args.runs * 1e3:.2f} ms")
        for (node_type, precision), seconds in sorted(by_type.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {node_type:<24} {precision:<6} {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
