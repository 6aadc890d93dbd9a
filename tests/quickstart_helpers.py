"""Shared by the quickstart tests: a training stage whose DiT is worth a parity check.

Two training steps leave the EMA DiT next to adaLN-Zero: its output is ~0.003 of its input's
RMS, every backend matches it trivially, and `mmgen parity` refuses it. The tests keep their
2-step recipes (CI time) and give the still-(almost-)zero tensors random values after the DiT
stage, as the parity tests do for fresh models, so the later stages compare real outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmgen_deploy.models.load import load_dit

# Parameters of a 2-step DiT that have hardly left their zero initialisation (measured: their
# largest entry is < 2e-4; the xavier-initialised weights are ~0.1).
NEAR_ZERO = 1e-3


def rerandomize_near_zero_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> list[str]:
    """Redraw every parameter whose entries are all below NEAR_ZERO (what `rerandomize_` does for
    exact zeros); returns their names."""
    gen = torch.Generator().manual_seed(seed)
    redrawn = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("pos_embed") or float(param.abs().max()) >= NEAR_ZERO:
                continue
            param.copy_(torch.randn(param.shape, generator=gen) * std)
            redrawn.append(name)
    return redrawn


def with_meaningful_dit(train_stage: Callable[[Any], str]) -> Callable[[Any], str]:
    """The quickstart's DiT stage, then the saved (EMA) DiT's near-zero tensors re-randomised."""

    def stage(ctx: Any) -> str:
        where = train_stage(ctx)
        dit = load_dit(ctx.run)
        redrawn = rerandomize_near_zero_(dit, seed=2)
        assert any("adaLN_modulation" in n for n in redrawn), redrawn  # the layers adaLN-Zero zeroed
        ctx.run.save_weights("dit", dit.eval())
        return where

    return stage


def small_real_evaluation(monkeypatch: Any) -> None:
    """The quickstart's own evaluation stage (ONNX Runtime FP32, the deployed path) on fewer images and
    steps (CI time): 1 per class or 6 prompts, 2 DDIM steps."""
    from mmgen_deploy.cli import quickstart as qs_cli

    monkeypatch.setattr(qs_cli, "QUICKSTART_EVAL", qs_cli.QuickstartEval(samples_per_class=1, num_prompts=6, steps=2))


def assert_evaluated_on_the_deployed_path(run: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """The quickstart's eval report, saved and in its summary, sampled on ONNX Runtime FP32 with the
    settings `small_real_evaluation` passed; returns its generation part."""
    from mmgen_deploy.io_utils import read_json

    # Named by its settings (ONNX Runtime FP32, fewer samples and steps than `mmgen eval`'s defaults).
    (path,) = run.reports_dir.glob("eval-onnxruntime-fp32-*steps2.json")
    saved = read_json(path)
    assert saved == summary["eval"]
    generation = saved["generation"]
    assert (generation["backend"], generation["precision"], generation["device"]) == ("onnxruntime", "fp32", "cpu")
    assert generation["steps"] == 2 and generation["sampler"] == "ddim"
    for key in ("accuracy", "colour_accuracy", "shape_accuracy"):
        assert 0.0 <= generation[key] <= 1.0, (key, generation[key])
    return generation


def fewer_generate_steps(monkeypatch: Any, steps: int = 4) -> None:
    """The quickstart's generate stage as written (its prompts or classes, batch, output folder),
    sampling `steps` DDIM steps instead of 50 (CI time; parity still runs its own 20-step check)."""
    import dataclasses

    from mmgen_deploy.cli import generate as generate_cli

    real_run_generate = generate_cli.run_generate

    def run_generate(run_dir: Any, request: Any) -> dict[str, Any]:
        return real_run_generate(run_dir, dataclasses.replace(request, steps=steps))

    monkeypatch.setattr(generate_cli, "run_generate", run_generate)


# An end-to-end check's name in the parity report -> its key in specs.PIPELINE_TOLERANCES.
END_TO_END_LIMITS = {"final latent rel_l2": "latent_rel_l2", "median image latent rel_l2": "median_latent_rel_l2",
                     "code index agreement": "min_index_agreement", "image PSNR (dB)": "min_psnr",
                     "image SSIM": "min_ssim"}


def assert_parity_within_spec(report: dict[str, Any], config: Any, precision: str) -> None:
    """Every figure of a saved parity report within the limit the specs set for it, on a denoiser whose
    output is not negligible: not only `passed`, which a report judged on loosened limits would also say."""
    from mmgen_deploy.parity.compare import MIN_OUTPUT_SCALE
    from mmgen_deploy.specs import PIPELINE_TOLERANCES, component_specs

    assert report["passed"] and report["meaningful"], report["verdict"]
    scale = report["info"]["denoiser_output_scale"]
    assert scale["threshold"] == MIN_OUTPUT_SCALE and scale["ratio"] >= MIN_OUTPUT_SCALE, scale
    specs = component_specs(config)
    shipped = report["info"].get("component_precisions", {})
    seen_groups, seen_end_to_end = set(), set()
    for check in report["checks"]:
        if check["group"] == "end-to-end":
            limit = PIPELINE_TOLERANCES[precision][END_TO_END_LIMITS[check["name"]]]
            seen_end_to_end.add(check["name"])
        else:
            spec = specs[check["group"]]
            tensor, metric, label = check["name"].split(" ", 2)  # e.g. "h rel_l2 (real, batch 3)"
            tolerance = spec.tolerance(shipped.get(spec.name, precision), tensor)
            kind = label.strip("()").split(",")[0]  # random or real
            limit = tolerance.limit(kind) if metric == "rel_l2" else tolerance.min_agreement
            seen_groups.add(spec.name)
        assert check["threshold"] == limit, check
        value = check["value"]
        within = value <= limit if check["direction"] == "<=" else value >= limit
        assert within, check
    assert seen_groups == set(specs), seen_groups  # every component was compared
    assert seen_end_to_end == set(END_TO_END_LIMITS), seen_end_to_end
