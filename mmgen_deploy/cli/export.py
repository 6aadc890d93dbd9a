"""`mmgen export RUN_DIR`: ONNX FP32 and mixed-precision FP16 graphs, validated against PyTorch."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mmgen_deploy.cli.common import console, count_column, emit_json, json_option, plural
from mmgen_deploy.errors import UsageError
from mmgen_deploy.specs import (
    ALL_COMPONENTS,
    DEFAULT_EXPORT_PRECISIONS,
    PARTS_WORD,
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    expand_parts,
)

if TYPE_CHECKING:
    from rich.table import Table

    from mmgen_deploy.rundir import RunLike


def _split(values: list[str] | None, allowed: tuple[str, ...], option: str) -> list[str] | None:
    """Accept repeated options and comma lists alike: --components encoder,decoder."""
    if not values:
        return None
    items = [v.strip().lower() for value in values for v in value.split(",") if v.strip()]
    if "all" in items:
        return None if option == "--components" else list(allowed)  # all = every component the model has
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UsageError(f"{option}: unknown value(s) {', '.join(bad) or '(none)'}",
                         f"choose from {', '.join(allowed)} or all")
    return items


def _exponent(text: str) -> str:
    """`8.9e-02` -> `8.9e-2`, `1e-05` -> `1e-5`: narrower columns, the same number."""
    mantissa, sep, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if sep else text


def _error_text(metric: str, value: float) -> str:
    """A validation value as the summary shows it: relative L2, or the share of equal indices (never
    rounded up to 100 %: any flipped index matters)."""
    if metric == "rel_l2":
        return "0" if value == 0 else _exponent(f"{value:.1e}")
    return "100 %" if value == 1.0 else f"{math.floor(value * 1e5) / 1e3:.3f} %"


def _limit_text(metric: str, limit: float) -> str:
    return _exponent(f"{limit:g}") if metric == "rel_l2" else _error_text(metric, limit)


def summary_table(manifest: dict[str, Any], precisions: list[str], components: list[str]) -> Table:
    """The validation of each exported graph: its worst error over the batches on random and on real
    inputs, next to the limit that output was checked against (the component spec's for its precision,
    as the manifest records it: random/real where they differ)."""
    from rich import box
    from rich.table import Table

    table = Table(title="vs PyTorch FP32 in ONNX Runtime CPU (worst over batches)", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True, caption_justify="left",
                  caption="random, real: the relative L2 error (indices: the share equal); limit: the component "
                          "spec's for that output and precision, random/real where they differ")
    for column in ("graph", "output", "random", "real", "limit", "MB"):
        table.add_column(column, no_wrap=True)
    table.add_column("FP32 kept / 8-bit")
    for precision in precisions:
        for component in components:
            entry = manifest["files"].get(precision, {}).get(component)
            if entry is None:
                continue
            if "quantization" in entry:  # an 8-bit set: what got Q/DQ, or which precision it ships at
                record = entry["quantization"]
                kept = (f"{entry['component_precision']}, unquantized" if entry["component_precision"] != precision
                        else f"{record['quantized_nodes']} Q/DQ, {len(record['high_precision_compute_nodes'])} high")
            else:
                kept = "-" if precision == "fp32" else (
                    "all" if entry.get("keep_fp32") else
                    f"{len(entry['kept_fp32_nodes'])}/{len(entry['kept_fp32_nodes']) + entry['fp16_nodes']}")
            by_output: dict[str, dict[str, dict[str, Any]]] = {}
            for row in entry["validation"]["worst"]:
                by_output.setdefault(row["output"], {})[row["inputs"]] = row
            for output, rows in by_output.items():
                real = rows.get("real", rows.get("dummy"))
                random = rows.get("random")
                limits = dict.fromkeys(_limit_text(row["metric"], row["tolerance"]) for row in (random, real) if row)
                errors = ("-" if row is None else _error_text(row["metric"], row["value"]) for row in (random, real))
                table.add_row(f"{precision}/{component}", output, *errors, "/".join(limits),
                              f"{entry['bytes'] / 1e6:.1f}", kept)
    return table


def _component_precisions(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        for item in value.split(","):
            name, sep, choice = item.strip().partition("=")
            if not sep or name not in ALL_COMPONENTS or choice not in ("fp32", "fp16", "quantize"):
                raise UsageError(f"--component-precision {item!r} is not COMPONENT=fp32|fp16|quantize",
                                 "e.g. --component-precision decoder=fp16")
            out[name] = choice
    return out


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory (made by `mmgen train`, `quickstart` or `import`)."),
        precision: list[str] = typer.Option(
            None, "--precision", "-p",
            help="fp32, fp16, int8, fp8 or all (repeat or comma-separate). Default: fp32,fp16. FP16 = mixed "
                 "precision by ModelOpt AutoCast; INT8 / FP8 = explicit Q/DQ graphs by ModelOpt PTQ, calibrated "
                 "on real data along the sampling trajectory; all for strongly typed TensorRT builds."),
        components: list[str] = typer.Option(
            None, "--components", "-c",
            help="Export only these: encoder, quantizer (VQ runs), decoder, denoiser, text_encoder "
                 "(text-to-image runs) (repeat or comma-separate); denoiser_parts adds the denoiser's head, body "
                 "and tail graphs that --cache runs (not part of all: they repeat the denoiser's weights). "
                 "Other components of an existing export of the same checkpoint are kept."),
        opset: int = typer.Option(18, "--opset", help="ONNX opset (17..20); >= 17 gives TensorRT native LayerNorm."),
        overwrite: bool = typer.Option(
            False, "--overwrite",
            help="Start afresh: the whole existing export (every precision set) is replaced, even one made from "
                 "a different checkpoint. Without it, the sets exported are added to an export of the same weights."),
        calibration: Path = typer.Option(
            None, "--calibration",
            help=".npz with `images` (N, C, H, W) in [-1, 1] or uint8, optional `labels` and `captions` (text "
                 "models): real data for the "
                 "FP16 range analysis and the real-data validation. Default: the run's own validation images "
                 "(the spec's dummy inputs when the run has no dataset)."),
        calibration_size: int = typer.Option(
            256, "--calibration-size", min=2,
            help="INT8/FP8: denoiser calibration samples (conditional and null halves together): at least two "
                 "per calibration timestep, one per step for a distilled student."),
        calibration_timesteps: int = typer.Option(
            8, "--calibration-timesteps", min=1,
            help="INT8/FP8: noise levels spread over the training schedule, both ends included (a distilled "
                 "student calibrates at its own steps instead)."),
        calibration_images: int = typer.Option(
            64, "--calibration-images", min=1,
            help="Calibration images. INT8/FP8 use N: real images (picked round-robin over classes) for the "
                 "encoder/decoder and the denoiser's latents. FP16 range analysis and real-data validation use "
                 "at most min(N, 16), fewer for components over ~125 GFLOP per sample; fewer = less time."),
        calibration_method: str = typer.Option("max", "--calibration-method",
                                               help="INT8/FP8 activation ranges: max or entropy."),
        high_precision: str = typer.Option(
            "fp16", "--high-precision",
            help="INT8/FP8: what is not quantized runs in fp16 (TensorRT) or fp32 (ONNX Runtime CPU integer "
                 "matmuls)."),
        component_precision: list[str] = typer.Option(
            None, "--component-precision",
            help="INT8/FP8: override the spec's per-component choice, COMPONENT=fp32|fp16|quantize "
                 "(repeatable), e.g. decoder=fp16."),
        external_data: bool = typer.Option(
            False, "--external-data",
            help="Write every graph's weights to <component>.onnx.data beside it (graphs over 2 GB always are)."),
        threads: int | None = typer.Option(
            None, "--threads", min=1,
            help="CPU threads of PyTorch and ONNX Runtime for the export, the FP16 range analysis, the 8-bit "
                 "calibration and the validation (default: 1 for small components, up to 8 for large ones)."),
        json_out: str = json_option("the manifest"),
    ) -> None:
        """Export every component to ONNX (FP32, mixed-precision FP16, INT8/FP8 Q/DQ), validated against PyTorch.

        Writes RUN_DIR/onnx/{fp32,fp16,int8,fp8}/<component>.onnx and RUN_DIR/onnx/manifest.json. Each graph is
        run in ONNX Runtime CPU on random and real inputs and compared with PyTorch FP32; any output beyond
        the tolerance fails the export (exit 1) and leaves the previous RUN_DIR/onnx untouched. Batch sizes
        are chosen by cost: 1, 3 and the engine profile's max for small models, two sizes for large ones.

        Graphs over 2 GB keep their weights in <component>.onnx.data (hashed and shipped with the graph).
        Each stage prints its time; a stage that would not fit in the available memory is refused
        before it starts, with the estimate.
        """
        from mmgen_deploy.export.onnx_export import check_opset

        check_opset(opset)  # before the progress bar starts
        from mmgen_deploy.export.quantize import QuantSettings

        precisions = _split(precision, PRECISIONS, "--precision") or list(DEFAULT_EXPORT_PRECISIONS)
        quantization = QuantSettings(calibration_size=calibration_size, timesteps=calibration_timesteps,
                                     images=calibration_images, method=calibration_method,
                                     high_precision=high_precision,
                                     component_precisions=_component_precisions(component_precision))
        # The text encoder exists only in text-to-image runs; the exporter refuses it for class models.
        chosen = _split(components, (*ALL_COMPONENTS, PARTS_WORD), "--components")
        quantized = any(p in QUANTIZED_PRECISIONS for p in precisions)
        if chosen or quantized:  # before the progress bar: what the run cannot export is refused at once
            from mmgen_deploy.export.exporter import normalize_selection
            from mmgen_deploy.rundir import RunDir
            from mmgen_deploy.specs import component_names

            config = RunDir(run_dir).load_config()
            if chosen:  # a class model has no text encoder to export
                normalize_selection(precisions, chosen, component_names(config, parts=True), component_names(config))
            if quantized:  # a distilled student calibrates at its own timesteps
                quantization.check_for(config)
        manifest = run_export(run_dir, precisions=precisions, components=chosen, opset=opset, overwrite=overwrite,
                              calibration=calibration, quantization=quantization,
                              external_data=True if external_data else None, calibration_images=calibration_images,
                              threads=threads)
        emit_json(manifest, json_out)


def run_export(run_dir: RunLike, *, precisions: list[str], components: list[str] | None = None,
               opset: int | None = None, overwrite: bool = False, calibration: Any = None,
               quantization: Any = None, external_data: bool | None = None,
               calibration_images: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """`export_run` with a progress bar, the validation table and where it went (what `mmgen export`
    and the quickstart's export stage print); returns the manifest. Each finished stage prints a
    line with its time."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from mmgen_deploy.export import export_run
    from mmgen_deploy.rundir import RunDir

    run = RunDir.of(run_dir)
    options: dict[str, Any] = {} if opset is None else {"opset": opset}
    # The run's writer lock before the progress bar: a busy run is refused in one line.
    with run.writing("export"), \
            Progress(TextColumn("{task.description}"), BarColumn(), count_column(),
                     TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("export", total=None)
        current: dict[str, Any] = {"step": None, "stage": "", "start": time.perf_counter()}

        def progress(message: str, done: int, total: int) -> None:
            # A new step prints the one that finished with its time: a log to plan with.
            if (done, total) != current["step"]:
                if current["step"] is not None:
                    bar.console.print(f"  {current['stage']}: {time.perf_counter() - current['start']:.1f} s")
                current.update(step=(done, total), stage=message, start=time.perf_counter())
            bar.update(task, description=message, completed=done, total=total or None)

        manifest = export_run(run, precisions=precisions, components=components, overwrite=overwrite,
                              calibration=calibration, progress=progress, quantization=quantization,
                              external_data=external_data, calibration_images=calibration_images, threads=threads,
                              **options)
    shown = list(expand_parts(components)) if components else list(manifest.get("components", ALL_COMPONENTS))
    console.print(summary_table(manifest, precisions, shown))
    console.print(f"[green]exported[/] to {run.onnx_dir} in {manifest['last_export']['seconds']:.1f} s "
                  f"(calibration: {manifest['calibration']['source']})")
    quant = manifest["calibration"].get("quantization")
    if quant is not None and any(p in manifest["last_export"]["precisions"] for p in QUANTIZED_PRECISIONS):
        den = quant["denoiser"]
        halves = "conditional + null halves" if den["halves"]["null"] else "conditional only: a distilled student"
        console.print(f"8-bit calibration: {den['samples']} denoiser samples ({halves}) at "
                      f"timesteps {den['timesteps']}, {plural(quant['encoder']['samples'], 'image')} "
                      f"({quant['source']}; {quant['settings']['method']} ranges)", soft_wrap=True)
    return manifest
