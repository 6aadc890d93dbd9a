"""Quickstart stages after training: the deployment path on the embedded default backend.

Each stage runs the real CLI command in-process, so the quickstart shows exactly what a
user would see running the commands one by one (and exercises the same code).
"""

from __future__ import annotations

from typing import Any

from mmgen_deploy.errors import MMGenError
from mmgen_deploy.specs import PRECISIONS

# The backend the main job runs on: ONNX Runtime on the CPU, the embedded default.
QUICKSTART_BACKEND = "onnxruntime"


def invoke(args: list[str]) -> int:
    """Run an `mmgen` command in-process; return its exit code (errors propagate as MMGenError)."""
    from mmgen_deploy.cli.app import app

    result = app(args=args, prog_name="mmgen", standalone_mode=False)
    return int(result or 0)


def export_stage(ctx: Any) -> str:
    code = invoke(["export", str(ctx.run.root), "--json", str(ctx.run.reports_dir / "export.json")])
    if code:
        raise MMGenError(f"export failed (exit {code})", "see the validation table above")
    return str(ctx.run.onnx_dir)


def generate_stage(ctx: Any) -> str:
    out = ctx.run.samples_dir / f"{QUICKSTART_BACKEND}-fp32"
    classes: list[str] = []
    for name in ctx.run.load_config().class_names:
        classes += ["--class", name]
    code = invoke(["generate", str(ctx.run.root), *classes, "--n", "2", "--steps", "50", "--sampler", "ddim",
                   "--cfg-scale", "4", "--seed", str(ctx.seed), "--backend", QUICKSTART_BACKEND,
                   "--precision", "fp32", "--batch-size", "18", "--out", str(out)])
    if code:
        raise MMGenError(f"generate failed (exit {code})")
    return str(out / "grid.png")


def generate_prompts_stage(ctx: Any) -> str:
    """A text-to-image run: two images for each of the fixed grid prompts (the training grid's)."""
    from mmgen_deploy.training.dit import grid_prompts

    out = ctx.run.samples_dir / f"{QUICKSTART_BACKEND}-fp32"
    prompts: list[str] = []
    for prompt in grid_prompts(ctx.train.captions):
        prompts += ["--prompt", prompt]
    code = invoke(["generate", str(ctx.run.root), *prompts, "--n", "2", "--steps", "50", "--sampler", "ddim",
                   "--cfg-scale", "4", "--seed", str(ctx.seed), "--backend", QUICKSTART_BACKEND,
                   "--precision", "fp32", "--batch-size", "18", "--out", str(out)])
    if code:
        raise MMGenError(f"generate failed (exit {code})")
    return str(out / "grid.png")


def _cpu_bf16_path() -> bool:
    """OpenVINO installed on a CPU with BF16 units: what `--backend auto` runs here."""
    from mmgen_deploy.cpuinfo import cpu_features
    from mmgen_deploy.runtime.openvino_runner import openvino_available

    return cpu_features().native_bf16 and openvino_available()


def parity_stage(ctx: Any) -> str:
    """Parity of the backend the quickstart used, FP32 and FP16, and of OpenVINO BF16 where auto would
    pick it (a CPU with AMX / AVX-512 BF16 and OpenVINO installed); a failure fails the quickstart."""
    verdicts = {}
    checks = [(QUICKSTART_BACKEND, precision) for precision in PRECISIONS]
    if _cpu_bf16_path():
        checks.append(("openvino", "bf16"))
    for backend, precision in checks:
        label = precision if backend == QUICKSTART_BACKEND else f"{backend} {precision}"
        report = ctx.run.reports_dir / f"parity-{backend}-{precision}.json"
        code = invoke(["parity", str(ctx.run.root), "--backend", backend, "--precision", precision])
        verdicts[label] = "PASSED" if code == 0 else "FAILED"
        ctx.results.setdefault("parity", {})[label] = str(report)
    if any(v == "FAILED" for v in verdicts.values()):
        raise MMGenError(f"parity failed: {verdicts}", "see the parity tables above and RUN_DIR/reports")
    return ", ".join(f"{p} {v}" for p, v in verdicts.items()) + f" ({ctx.run.reports_dir})"
