"""The runner contract, the same tests for every CPU backend and precision: the spec's output names,
shapes and dtypes at two batch sizes, agreement with PyTorch FP32 within the spec's tolerance for
that precision (the quantizer bit-exact at every precision), reuse of preallocated output buffers,
and one-line errors for bad feeds. Then what is particular to OpenVINO and to `auto`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from export_helpers import record_as_exported

from mmgen_deploy.cli.common import describe_error
from mmgen_deploy.errors import MMGenError, NotAvailableError, UsageError
from mmgen_deploy.runtime import Runner, open_runner, resolve_backend
from mmgen_deploy.specs import component_specs


def _openvino_missing() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install 'mmgen-deploy[openvino]')"
    return None


def _no_bf16_cpu() -> str | None:
    from mmgen_deploy.cpuinfo import cpu_features

    return None if cpu_features().native_bf16 else "this CPU has no AMX or AVX-512 BF16"


needs_openvino = pytest.mark.skipif(_openvino_missing() is not None, reason=_openvino_missing() or "")

# (backend, precision, preallocates outputs)
RUNNERS = [
    pytest.param("torch", "fp32", False, id="torch-fp32"),
    pytest.param("torch", "bf16", False, id="torch-bf16",
                 marks=pytest.mark.skipif(_no_bf16_cpu() is not None, reason=_no_bf16_cpu() or "")),
    pytest.param("onnxruntime", "fp32", True, id="onnxruntime-fp32"),
    pytest.param("openvino", "fp32", True, id="openvino-fp32", marks=needs_openvino),
    pytest.param("openvino", "bf16", True, id="openvino-bf16",
                 marks=[needs_openvino,
                        pytest.mark.skipif(_no_bf16_cpu() is not None, reason=_no_bf16_cpu() or "")]),
]


@pytest.fixture(scope="module")
def reference(exported_tiny_run):
    runner, _choice = open_runner(exported_tiny_run.root, "torch", "fp32")
    yield runner
    runner.close()


@pytest.mark.parametrize(("backend", "precision", "preallocates"), RUNNERS)
def test_runner_contract(exported_tiny_run, reference, backend: str, precision: str, preallocates: bool) -> None:
    runner, choice = open_runner(exported_tiny_run.root, backend, precision, threads=1)
    try:
        assert (choice.backend, choice.precision) == (backend, precision)
        assert isinstance(runner, Runner)
        assert (runner.backend, runner.precision, runner.device) == (backend, precision, "cpu")
        specs = component_specs(exported_tiny_run.load_config())
        rng = np.random.default_rng(0)
        for name in ("denoiser", "quantizer", "decoder"):
            spec = specs[name]
            for batch in (1, 3):  # the dynamic batch axis, and a second set of buffers
                feeds = spec.make_inputs(batch, rng)
                got = runner.run(name, feeds)
                want = reference.run(name, feeds)
                assert sorted(got) == sorted(spec.output_names)
                for tensor in spec.outputs:
                    out = got[tensor.name]
                    assert out.shape == tensor.concrete_shape(batch) and out.dtype == np.dtype(tensor.dtype)
                    tol = spec.tolerance(precision, tensor.name)
                    if tensor.is_float:
                        rel = np.linalg.norm(out - want[tensor.name]) / np.linalg.norm(want[tensor.name])
                        assert rel <= tol.rel_l2, (name, tensor.name, batch, rel)
                    else:
                        assert np.array_equal(out, want[tensor.name]), (name, tensor.name)
                if preallocates:
                    first = {k: v for k, v in got.items()}
                    again = runner.run(name, spec.make_inputs(batch, rng))
                    for key, value in again.items():
                        assert value is first[key], f"{backend}: {name}.{key} not written into the same buffer"
        # Bad feeds: one message naming the tensor, before the runtime sees them.
        spec = specs["denoiser"]
        feeds = spec.make_inputs(2, rng)
        with pytest.raises(MMGenError, match=r"denoiser\.t: dtype float64"):
            runner.run("denoiser", {**feeds, "t": feeds["t"].astype(np.float64)})
        with pytest.raises(MMGenError, match=r"denoiser\.x_t: shape"):
            runner.run("denoiser", {**feeds, "x_t": feeds["x_t"][:, :, :4]})
        with pytest.raises(MMGenError, match=r"missing \['class_ids'\]"):
            runner.run("denoiser", {k: v for k, v in feeds.items() if k != "class_ids"})
        with pytest.raises(UsageError, match="unknown component 'vae'"):
            runner.run("vae", feeds)
    finally:
        runner.close()


# -- OpenVINO particulars -------------------------------------------------------------------------

@needs_openvino
def test_openvino_compiles_once_per_batch_and_dynamic_mode_agrees(exported_tiny_run) -> None:
    from mmgen_deploy.runtime.openvino_runner import OpenVinoRunner

    static = OpenVinoRunner(exported_tiny_run.root, "fp32", threads=1)
    dynamic = OpenVinoRunner(exported_tiny_run.root, "fp32", threads=1, batch_mode="dynamic")
    spec = static.specs["denoiser"]
    rng = np.random.default_rng(1)
    for batch in (2, 4, 2):
        feeds = spec.make_inputs(batch, rng)
        a = static.run("denoiser", feeds)["model_output"].copy()
        b = dynamic.run("denoiser", feeds)["model_output"]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert static.compiled_batches("denoiser") == [4, 2]  # batch 2 reused, most recent last
    assert OpenVinoRunner(exported_tiny_run.root, "fp32", cache_dir="").cache_dir is None


@needs_openvino
def test_openvino_splits_a_batch_across_streams_exactly(exported_tiny_run) -> None:
    """Two streams take half a batch each (an odd batch pads its last half) and write one output
    buffer: FP32 results equal one request's, row for row, and the buffer is reused."""
    from mmgen_deploy.runtime.openvino_runner import OpenVinoRunner

    one = OpenVinoRunner(exported_tiny_run.root, "fp32", streams=1, cache_dir="")
    two = OpenVinoRunner(exported_tiny_run.root, "fp32", streams=2, cache_dir="")
    assert (one.streams, two.streams) == (1, 2)
    assert OpenVinoRunner(exported_tiny_run.root, "fp32", threads=1).streams == 1
    rng = np.random.default_rng(2)
    for component in ("denoiser", "decoder", "quantizer"):
        spec = two.specs[component]
        for batch in (1, 3, 4):
            feeds = spec.make_inputs(batch, rng)
            want = one.run(component, feeds)
            got = two.run(component, feeds)
            for name, value in got.items():
                assert value.shape == want[name].shape, (component, batch, name)
                np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6, err_msg=f"{component} {batch}")
            again = two.run(component, spec.make_inputs(batch, rng))
            assert all(again[name] is got[name] for name in got)
    assert two._components["denoiser"].batches[3].chunk == 2
    with pytest.raises(UsageError, match="streams must be >= 1"):
        OpenVinoRunner(exported_tiny_run.root, "fp32", streams=0)
    with pytest.raises(UsageError, match="unknown batch_mode"):
        OpenVinoRunner(exported_tiny_run.root, "fp32", batch_mode="sometimes")


@needs_openvino
def test_openvino_blob_cache_imports_what_an_earlier_process_compiled(exported_tiny_run, tmp_path) -> None:
    """The first runner compiles and stores a blob per shape; a later one imports it (same outputs);
    a corrupt blob is recompiled and replaced; an edited graph gets a
    new blob that replaces the old one instead of piling up beside it."""
    import os
    import shutil

    from mmgen_deploy.runtime.openvino_runner import OpenVinoRunner

    run = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, run)
    cache = tmp_path / "cache"
    spec = OpenVinoRunner(run, "bf16", cache_dir=cache).specs["denoiser"]
    feeds = spec.make_inputs(2, np.random.default_rng(3))

    def run_once() -> tuple[str, np.ndarray]:
        with OpenVinoRunner(run, "bf16", threads=1, cache_dir=cache) as runner:
            out = runner.run("denoiser", feeds)["model_output"].copy()
            return runner.compiled_origins("denoiser")[2], out

    origin, first = run_once()
    blobs = sorted(cache.glob("*-denoiser-bf16-cpu-b2-*.blob"))
    assert origin == "compiled" and len(blobs) == 1
    origin, again = run_once()
    assert origin == "cache"
    np.testing.assert_array_equal(again, first)
    graph = run / "onnx" / "fp32" / "denoiser.onnx"
    blobs[0].write_bytes(b"not a blob")
    origin, recompiled = run_once()
    assert origin == "compiled" and blobs[0].stat().st_size > 100
    np.testing.assert_array_equal(recompiled, first)
    # An edited graph (here: the same bytes with a new mtime) is compiled anew; its blob replaces the old.
    stat = graph.stat()
    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    origin, _ = run_once()
    after = sorted(cache.glob("*-denoiser-bf16-cpu-b2-*.blob"))
    assert origin == "compiled" and len(after) == 1 and after != blobs
    # The f32 quantizer and a bf16 denoiser never share a blob (the hint is in the name and the key).
    with OpenVinoRunner(run, "fp32", threads=1, cache_dir=cache) as runner:
        runner.run("denoiser", feeds)
        assert runner.compiled_origins("denoiser")[2] == "compiled"
    assert len(list(cache.glob("*-denoiser-*-cpu-b2-*.blob"))) == 2
    # Without the export manifest the graph is hashed itself: the same identity, so the same blob.
    (run / "onnx" / "manifest.json").unlink()
    origin, _ = run_once()
    assert origin == "cache"


@needs_openvino
def test_openvino_blob_folder_stays_under_its_limit(exported_tiny_run, tmp_path, monkeypatch) -> None:
    """After each write the least recently used blobs go until the folder fits its limit; the blob
    just written always stays; a limit that is not a number is refused in one line."""
    from mmgen_deploy.runtime.openvino_runner import OpenVinoRunner

    cache = tmp_path / "cache"
    rng = np.random.default_rng(4)

    def compile_batches(*batches: int) -> dict[int, str]:
        with OpenVinoRunner(exported_tiny_run.root, "fp32", threads=1, cache_dir=cache) as runner:
            spec = runner.specs["denoiser"]
            for batch in batches:
                runner.run("denoiser", spec.make_inputs(batch, rng))
            return runner.compiled_origins("denoiser")

    monkeypatch.setenv("MMGEN_OPENVINO_CACHE_GB", "1e-9")  # one byte: only the newest blob fits
    compile_batches(2, 3)
    names = [p.name for p in cache.glob("*.blob")]
    assert len(names) == 1 and "-denoiser-f32-cpu-b3-" in names[0], names
    monkeypatch.setenv("MMGEN_OPENVINO_CACHE_GB", "10")
    assert compile_batches(2, 3) == {2: "compiled", 3: "cache"}  # batch 2's blob had been evicted
    assert len(list(cache.glob("*.blob"))) == 2
    monkeypatch.setenv("MMGEN_OPENVINO_CACHE_GB", "lots")
    with pytest.raises(UsageError, match="MMGEN_OPENVINO_CACHE_GB='lots' is not a number"):
        compile_batches(2)


@needs_openvino
def test_openvino_refusals_are_one_line(exported_tiny_run, tmp_path) -> None:
    from mmgen_deploy.runtime.openvino_runner import OpenVinoRunner

    with pytest.raises(NotAvailableError, match="OpenVINO finds no NPU device here"):
        OpenVinoRunner(exported_tiny_run.root, "fp32", device="npu")
    with pytest.raises(UsageError, match="unknown OpenVINO device 'tpu'"):
        OpenVinoRunner(exported_tiny_run.root, "fp32", device="tpu")
    with pytest.raises(UsageError, match=r"openvino backend runs fp32 .*bf16.*, not .int4."):
        OpenVinoRunner(exported_tiny_run.root, "int4")
    with pytest.raises(NotAvailableError, match="no int8 ONNX set"):  # quant's INT8 set, not exported here
        OpenVinoRunner(exported_tiny_run.root, "int8")
    with pytest.raises(UsageError, match=r"onnxruntime backend runs fp32.*not 'bf16'") as refused:
        open_runner(exported_tiny_run.root, "onnxruntime", "bf16")
    # The library names the settings; the CLI its options.
    assert "use backend openvino precision bf16" in str(refused.value)
    assert "use --backend openvino --precision bf16" in describe_error(refused.value)
    # A corrupt graph: refused when the component is first used, naming the file.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, copy)
    (copy / "onnx" / "fp32" / "decoder.onnx").write_bytes(b"not an onnx file")
    runner = OpenVinoRunner(copy, "fp32")
    spec = runner.specs["decoder"]
    with pytest.raises(MMGenError, match=r"decoder\.onnx \(or its external data\) is not the graph"):
        runner.run("decoder", spec.make_inputs(1, np.random.default_rng(0)))
    (copy / "onnx" / "manifest.json").unlink()  # hand-made ONNX files: no hashes, OpenVINO's reader refuses
    runner = OpenVinoRunner(copy, "fp32")
    with pytest.raises(MMGenError, match=r"OpenVINO cannot read .*decoder\.onnx"):
        runner.run("decoder", spec.make_inputs(1, np.random.default_rng(0)))


@needs_openvino
@pytest.mark.skipif(_no_bf16_cpu() is not None, reason=_no_bf16_cpu() or "")
def test_openvino_says_so_when_it_cannot_keep_the_fp32_scopes(exported_tiny_run, tmp_path, monkeypatch) -> None:
    """Where marking the FP32 scopes fails (an OpenVINO whose IR writer differs), bf16 is refused in
    one line naming the scope and the way out, instead of running with the timestep in BF16."""
    import openvino as ov

    from mmgen_deploy.runtime.openvino_runner import OpenVinoRunner

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp:1\nsecond line")

    monkeypatch.setattr(ov, "save_model", refuse)
    with OpenVinoRunner(exported_tiny_run.root, "bf16", cache_dir=tmp_path / "cache") as runner:
        feeds = runner.specs["denoiser"].make_inputs(2, np.random.default_rng(0))
        expected = (r"cannot keep denoiser's dit\.t_embedder FP32 under the bf16 hint: "
                    r"Exception from src/core/src/pass/serialize\.cpp:1 \(use precision fp32")
        with pytest.raises(NotAvailableError, match=expected):
            runner.run("denoiser", feeds)


# -- auto ----------------------------------------------------------------------------------------

def test_auto_picks_what_the_rule_says_for_this_cpu_and_run(exported_tiny_run) -> None:
    """The tiny run: ONNX Runtime FP32 on every CPU (its denoiser is too small for OpenVINO's fixed
    cost to pay), with the reason OpenVINO BF16 was skipped."""
    from conftest import cpu_auto_choice

    choice = resolve_backend("auto", exported_tiny_run.root)
    assert (choice.backend, choice.precision) == cpu_auto_choice() == ("onnxruntime", "fp32")
    reason = next(s for s in choice.skipped if s.startswith("openvino bf16: "))
    assert "GFLOP" in reason or "AMX" in reason or "not installed" in reason, reason
    # Asking for FP32 keeps the FP32-exact ONNX Runtime path.
    assert resolve_backend("auto", exported_tiny_run.root, "fp32").backend == "onnxruntime"


_WITHOUT_OPENVINO = (
    "import sys\n"
    "sys.modules['openvino'] = None  # `import openvino` now raises ImportError, as where it is not installed\n"
)


def test_auto_falls_back_cleanly_without_openvino(exported_tiny_run, tmp_path) -> None:
    """A Python in which `import openvino` fails: auto says why it skipped OpenVINO and samples on
    ONNX Runtime; asking for OpenVINO is one line naming the package."""
    root = str(exported_tiny_run.root)
    code = _WITHOUT_OPENVINO + (
        "from mmgen_deploy.runtime import open_runner\n"
        "from mmgen_deploy.sampling import sample\n"
        f"r, choice = open_runner({root!r}, 'auto', threads=1)\n"
        "print(r.backend, r.precision)\n"
        "print('|'.join(choice.skipped))\n"
        "sample(r, r.config, [1], steps=2, cfg_scale=4.0)\n"
        "try:\n"
        f"    open_runner({root!r}, 'openvino', 'bf16')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "onnxruntime fp32", out.stdout
    assert "openvino bf16: " in lines[1]
    if not _no_bf16_cpu():
        # Asked for explicitly, bf16 goes past the size rule and finds OpenVINO missing.
        fp = subprocess.run([sys.executable, "-c", _WITHOUT_OPENVINO + (
            "from mmgen_deploy.runtime import resolve_backend\n"
            f"print('|'.join(resolve_backend('auto', {root!r}, 'bf16').skipped))\n")],
            capture_output=True, text=True, timeout=300)
        assert "OpenVINO is not installed" in fp.stdout, fp.stdout + fp.stderr
    assert lines[2].startswith("NotAvailableError OpenVINO is not installed") and "mmgen-deploy[openvino]" in lines[2]
    # The CLI: exit 1, one line, no traceback.
    cli = _WITHOUT_OPENVINO + ("from mmgen_deploy.cli.app import main\n"
                               f"main(['generate', {root!r}, '-c', '1', '--n', '1', '--steps', '1', "
                               f"'--backend', 'openvino', '--out', {str(tmp_path / 'out')!r}])\n")
    out = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1 and "OpenVINO is not installed" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


# -- bf16 parity: passes on the exported graph, fails on a perturbed one --------------------------

def _perturb(onnx_path, initializer: str, scale: float) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    (init,) = [i for i in model.graph.initializer if i.name == initializer]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(scale), initializer))
    onnx.save(model, str(onnx_path))
    record_as_exported(onnx_path)


@pytest.mark.parametrize("perturbed", [False, True], ids=["exported", "perturbed"])
@needs_openvino
def test_openvino_bf16_parity_passes_and_catches_a_perturbed_graph(exported_tiny_run, tmp_path,
                                                                    perturbed: bool) -> None:
    """The spec's bf16 tolerances are loose enough for BF16 rounding and tight enough for a real bug:
    the patch embedding's weights scaled by 1.08 in the denoiser graph (rel. L2 ~4e-2 in FP32) fail."""
    import shutil

    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    run = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, run)
    if perturbed:
        _perturb(run / "onnx" / "fp32" / "denoiser.onnx", "dit.x_embedder.proj.weight", 1.08)
    report = run_parity(run, ParityOptions(backend="openvino", precision="bf16", batches=(1, 3), steps=3,
                                           num_images=2, end_to_end=not perturbed,
                                           components=("denoiser", "quantizer", "decoder")))
    failed = sorted({c.group for c in report.checks if not c.passed})
    if perturbed:
        assert not report.passed and failed == ["denoiser"], failed
    else:
        assert report.passed, [(c.group, c.name, c.value, c.threshold) for c in report.checks if not c.passed]
        assert any(c.group == "end-to-end" for c in report.checks)


@needs_openvino
@pytest.mark.skipif(_no_bf16_cpu() is not None, reason=_no_bf16_cpu() or "")
def test_openvino_bf16_keeps_the_timestep_path_fp32(exported_tiny_run, tmp_path) -> None:
    """Under the bf16 hint OpenVINO rounds the timestep input itself to 8 bits (998 and 999 both
    become 1000), unless the spec's FP32 scope is marked (`openvino_graphs`): then the runner's
    denoiser tells neighbouring timesteps apart. The marked graph computes what the original does
    (compared under the f32 hint), and its compiled blob is not the unmarked graph's."""
    import openvino as ov

    from mmgen_deploy.runtime.openvino_graphs import keep_scopes_fp32
    from mmgen_deploy.runtime.openvino_runner import OpenVinoRunner

    graph = str(exported_tiny_run.onnx_dir / "fp32" / "denoiser.onnx")
    spec = component_specs(exported_tiny_run.load_config())["denoiser"]
    feeds = spec.make_inputs(4, np.random.default_rng(5))
    feeds["x_t"][:] = feeds["x_t"][:1]  # one latent and class at four timesteps
    feeds["class_ids"][:] = feeds["class_ids"][:1]
    feeds["t"][:] = [996, 997, 998, 999]
    core = ov.Core()

    def outputs(model, hint: str) -> np.ndarray:
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        return compiled(feeds)[0].copy()

    plain = outputs(core.read_model(graph), "bf16")
    # OpenVINO's behaviour that the marks exist for: if this fails, OpenVINO keeps t in FP32 itself.
    assert np.array_equal(plain[2], plain[3]) and np.array_equal(plain[0], plain[1])

    marked_model = core.read_model(graph)
    assert keep_scopes_fp32(ov, core, marked_model, spec.fp32_scopes) >= 4  # Reshape, Mul, Cos, Sin, ...
    assert not [op for op in marked_model.get_ops() if op.get_type_name() == "Unsqueeze"
                and op.get_friendly_name().startswith("/dit/t_embedder/")]
    np.testing.assert_allclose(outputs(marked_model, "f32"), outputs(core.read_model(graph), "f32"),
                               rtol=0, atol=1e-6)

    with OpenVinoRunner(exported_tiny_run, "bf16", threads=1, cache_dir=tmp_path / "cache") as runner:
        served = runner.run("denoiser", feeds)["model_output"]
        assert all(not np.array_equal(served[i], served[i + 1]) for i in range(3))
        reference, _ = open_runner(exported_tiny_run.root, "torch", "fp32")
        expected = reference.run("denoiser", feeds)["model_output"]
        # Nearer FP32 than the unmarked graph: the embedding of the right timestep.
        assert np.linalg.norm(served - expected) < np.linalg.norm(plain - expected)
