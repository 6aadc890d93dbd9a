"""`mmgen export RUN_DIR`: ONNX FP32 and mixed-precision FP16 graphs, validated against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmgen_deploy.cli.common import console, emit_json
from mmgen_deploy.errors import UsageError
from mmgen_deploy.specs import COMPONENTS, PRECISIONS


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


def _print_summary(manifest: dict[str, Any], precisions: list[str], components: list[str]) -> None:
    from rich.table import Table

    table = Table(title="vs PyTorch FP32 in ONNX Runtime CPU (worst over batches)")
    for column in ("graph", "output", "random", "real", "MB", "FP32 kept"):
        table.add_column(column, no_wrap=True)
    for precision in precisions:
        for component in components:
            entry = manifest["files"].get(precision, {}).get(component)
            if entry is None:
                continue
            kept = "-" if precision == "fp32" else (
                "all" if entry.get("keep_fp32") else
                f"{len(entry['kept_fp32_nodes'])}/{len(entry['kept_fp32_nodes']) + entry['fp16_nodes']}")
            by_output: dict[str, dict[str, str]] = {}
            for row in entry["validation"]["worst"]:
                if row["metric"] == "rel_l2":
                    text = f"{row['value']:.1e}"
                else:  # never round 99.9 % up to "100 %": any flipped index matters
                    text = "all equal" if row["value"] == 1.0 else f"{row['value']:.3%} equal"
                by_output.setdefault(row["output"], {})[row["inputs"]] = text
            for output, values in by_output.items():
                real = values.get("real", values.get("dummy", "-"))
                table.add_row(f"{precision}/{component}", output, values.get("random", "-"), real,
                              f"{entry['bytes'] / 1e6:.1f}", kept)
    console.print(table)
    console.print("errors are relative L2 (tolerance: FP32 1e-5, FP16 1e-2); indices must all be the same")


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory (made by `mmgen train`, `quickstart` or `import`)."),
        precision: list[str] = typer.Option(
            None, "--precision", "-p",
            help="fp32, fp16 or all (repeat or comma-separate). Default: both. FP16 = mixed precision "
                 "by ModelOpt AutoCast, for strongly typed TensorRT builds."),
        components: list[str] = typer.Option(
            None, "--components", "-c",
            help="Export only these: encoder, quantizer, decoder, denoiser, text_encoder (text-to-image runs) "
                 "(repeat or comma-separate). "
                 "Other components of an existing export of the same checkpoint are kept."),
        opset: int = typer.Option(18, "--opset", help="ONNX opset (17..20); >= 17 gives TensorRT native LayerNorm."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace an existing export even if it came from a different checkpoint."),
        calibration: Path = typer.Option(
            None, "--calibration",
            help=".npz with `images` (N, C, H, W) in [-1, 1] or uint8, optional `labels` and `captions` (text "
                 "models): real data for the "
                 "FP16 range analysis and the real-data validation. Default: spec dummy inputs."),
        json_out: str = typer.Option(None, "--json", help="Write the manifest as JSON to FILE ('-' = stdout)."),
    ) -> None:
        """Export every component to ONNX (FP32 and mixed-precision FP16), validated against PyTorch.

        Writes RUN_DIR/onnx/{fp32,fp16}/<component>.onnx and RUN_DIR/onnx/manifest.json. Each graph is
        run in ONNX Runtime CPU at batch 1, 3 and the engine profile's max, on random and real inputs,
        and compared with PyTorch FP32; any output beyond the tolerance fails the export (exit 1) and
        leaves the previous RUN_DIR/onnx untouched.
        """
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from mmgen_deploy.export import export_run
        from mmgen_deploy.export.onnx_export import check_opset

        check_opset(opset)  # before the progress bar starts
        precisions = _split(precision, PRECISIONS, "--precision") or list(PRECISIONS)
        # The text encoder exists only in text-to-image runs; the exporter refuses it for class models.
        chosen = _split(components, COMPONENTS, "--components")
        if chosen:  # before the progress bar: a class model has no text encoder to export
            from mmgen_deploy.export.exporter import normalize_selection
            from mmgen_deploy.rundir import RunDir
            from mmgen_deploy.specs import component_names

            normalize_selection(precisions, chosen, component_names(RunDir(run_dir).load_config()))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=False) as bar:
            task = bar.add_task("export", total=None)

            def progress(message: str, done: int, total: int) -> None:
                bar.update(task, description=message, completed=done, total=total)

            manifest = export_run(run_dir, precisions=precisions, components=chosen, opset=opset,
                                  overwrite=overwrite, calibration=calibration, progress=progress)
        _print_summary(manifest, precisions, chosen or list(manifest.get("components", COMPONENTS)))
        console.print(f"[green]exported[/] to {Path(run_dir) / 'onnx'} in {manifest['last_export']['seconds']:.1f} s "
                      f"(calibration: {manifest['calibration']['source']})")
        emit_json(manifest, json_out)
