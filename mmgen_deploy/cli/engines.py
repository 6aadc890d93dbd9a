"""`mmgen build-engine`: FP16 / INT8 / FP8 ONNX set -> one TensorRT / TensorRT-RTX engine per component."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from mmgen_deploy.cli.common import console, emit_json, json_option, split_list
from mmgen_deploy.errors import UsageError

_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
               "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise UsageError(f"invalid --workspace {text!r}", "give a size such as 512MiB, 2GiB or a byte count")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size < 2**20:
        raise UsageError(f"--workspace {text!r} is below 1 MiB", "TensorRT needs at least a few MiB; try 256MiB")
    return size


def parse_batch(text: str) -> Any:
    from mmgen_deploy.specs import BatchProfile

    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3  # a single number: a static batch
    try:
        numbers = [int(p) for p in parts]
        if len(numbers) != 3:
            raise ValueError
        return BatchProfile(*numbers)
    except ValueError:
        raise UsageError(f"invalid --batch-profile {text!r}",
                         "give MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX (per sample; the denoiser's is doubled "
                         "for guidance), or one number for a static batch") from None


def _pick_runtime(requested: str) -> str:
    if requested != "auto":
        return requested
    from mmgen_deploy.engines.flavour import install_hint, installed_flavours
    from mmgen_deploy.engines.manifest import current_gpu
    from mmgen_deploy.errors import NotAvailableError

    flavours = {f.runtime: f for f in installed_flavours()}
    if "tensorrt" in flavours and current_gpu() is not None:
        return "tensorrt"
    if "tensorrt-rtx" in flavours:
        return "tensorrt-rtx"
    raise NotAvailableError("no usable TensorRT flavour is installed", install_hint("tensorrt"))


def register(app: typer.Typer) -> None:
    @app.command("build-engine")
    def build_engine(
        run_dir: Path = typer.Argument(..., help="Run directory with an exported ONNX set (`mmgen export`)."),
        runtime: str = typer.Option(
            "auto", "--runtime", "-r",
            help="tensorrt (TensorRT 10.x/11.x, needs the target GPU), tensorrt-rtx (ahead of time, no GPU "
                 "needed), or auto (tensorrt when it and a GPU are present, else tensorrt-rtx)."),
        batch_profile: str | None = typer.Option(
            None, "--batch-profile", "--batch", metavar="MIN:OPT:MAX",
            help="Per-sample batch range overriding the component specs (the denoiser's is doubled for "
                 "classifier-free guidance); one number = static."),
        workspace: str | None = typer.Option(
            None, "--workspace", help="Cap the builder's scratch memory, e.g. 512MiB on small edge devices."),
        opt_level: int | None = typer.Option(
            None, "--opt-level", min=0, max=5,
            help="Builder optimization level 0-5 (TensorRT's default 3; lower builds faster, higher may run faster)."),
        compute_capability: list[str] = typer.Option(
            [], "--compute-capability", "--cc",
            help="TensorRT-RTX target GPUs, repeatable: sm75, sm80, sm86, sm89, sm120... (default: Ampere and "
                 "later, i.e. sm80/sm86/sm89/sm120; Turing needs sm75)."),
        component: list[str] = typer.Option(
            [], "--components", "--component", "-c",
            help="Build only these components (repeat or comma-separate, as in export: encoder, quantizer for VQ "
                 "runs, decoder, denoiser, text_encoder for text models); others keep their plans."),
        precision: str = typer.Option(
            "fp16", "--precision",
            help="Which ONNX set to build from: fp16, int8, fp8 (Q/DQ sets of `mmgen export --precision int8,fp8`; "
                 "FP8 needs SM 8.9+: with tensorrt-rtx name --cc sm89/sm120) or fp32. Each precision gets its own "
                 "engine folder."),
        rebuild: bool = typer.Option(False, "--rebuild", "--force",
                                     help="Rebuild every engine even when its plan could be reused."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Echo TensorRT's log."),
        json_out: str | None = json_option("build times and sizes"),
    ) -> None:
        """Build strongly typed engines, one per component, with a manifest that later loads check.

        Engines go to RUN_DIR/engines/<runtime>-<version>-<gpu or aot>/. A component whose ONNX and options have not changed reuses its plan; TensorRT's timing cache is kept between builds. TensorRT-RTX builds ahead of time on any machine, even without a GPU.
        """  # noqa: E501 (one line per paragraph: the help formatter keeps hard line breaks)
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from mmgen_deploy.engines.builder import BuildOptions, build_engines
        from mmgen_deploy.rundir import RunDir
        from mmgen_deploy.specs import component_names

        run = RunDir(run_dir)
        config = run.load_config()  # fail early, with the run directory's own message
        options = BuildOptions(
            runtime=_pick_runtime(runtime),
            precision=precision,
            batch=parse_batch(batch_profile) if batch_profile else None,
            workspace_bytes=parse_size(workspace) if workspace else None,
            opt_level=opt_level,
            compute_capabilities=tuple(compute_capability),
            components=tuple(split_list(component)) or component_names(config),
            force=rebuild,
            verbose=verbose,
        )
        # The run's writer lock before the progress bar: a busy run is refused in one line.
        with run.writing("build engines"), \
                Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                         TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
                         transient=True) as bar:
            task = bar.add_task(f"building {options.runtime} engines", total=len(options.components))

            def on_progress(name: str, event: str, detail: dict[str, Any]) -> None:
                if event == "start":
                    bar.update(task, description=f"{options.runtime}: {name}")
                else:  # one line per finished engine, with its time: long builds show where they are
                    bar.console.print(f"  {name}: {event}" + (f" in {detail['seconds']:.1f} s"
                                                               if event == "built" else ""))
                    bar.advance(task)

            result = build_engines(run, options, progress=on_progress)

        table = Table(title=f"{result.manifest['runtime']} {result.manifest['version']} "
                            f"({result.manifest['target']})", title_justify="left")
        for column in ("component", "plan size", "build time", ""):
            table.add_column(column, justify="right" if column in ("plan size", "build time") else "left")
        for item in result.components:
            table.add_row(item.name, f"{item.plan_bytes / 2**20:.2f} MiB",
                          "-" if item.reused else f"{item.build_seconds:.2f} s", "reused" if item.reused else "built")
        console.print(table)
        console.print(f"total {result.total_seconds:.2f} s; engines and manifest in {result.directory}",
                      soft_wrap=True)
        emit_json(result.to_dict(), json_out)
