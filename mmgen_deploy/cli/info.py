from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from mmgen_deploy.cli.common import emit_json, json_option, stdout_console

# Runs with more classes (ImageNet's 1000) show the first half of this many; --json has them all.
_CLASSES_SHOWN = 60


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        run_dir: Path = typer.Argument(..., help="Run directory to describe."),
        json_out: str | None = json_option("the run's description"),
    ) -> None:
        """Describe a run directory: configs, parameter counts, which artifacts exist. Loads (and so
        verifies) every weight file."""
        from mmgen_deploy.rundir import RunDir

        run = RunDir(run_dir)
        from mmgen_deploy.config import VQConfig
        from mmgen_deploy.models.load import load_deployable
        from mmgen_deploy.rundir import first_stage_part

        parts = load_deployable(run)
        config, vq, dit = parts.config, parts.first_stage, parts.dit
        stage_part = first_stage_part(config)
        report: dict[str, Any] = {
            "run_dir": str(run.root),
            "first_stage": config.first_stage_kind,
            stage_part: {"params": sum(p.numel() for p in vq.parameters()), "config": config.first_stage.to_dict()},
            "dit": {"params": sum(p.numel() for p in dit.parameters() if p.requires_grad),
                    "config": config.dit.to_dict()},
            "class_names": list(config.class_names),
            "artifacts": {path.name: path.is_dir() for path in (run.checkpoints_dir, run.onnx_dir, run.engines_dir,
                                                                run.samples_dir, run.reports_dir)},
            "weights_sha256": run.weights_sha256(),
        }
        if config.audio is not None:
            report["audio"] = config.audio.to_dict()
        if json_out == "-":
            emit_json(report, "-")
            return
        table = Table(title=f"run {run.root}")
        table.add_column("item")
        table.add_column("value")
        stage_label = "VQ-VAE" if isinstance(config.first_stage, VQConfig) else "KL autoencoder"
        table.add_row(f"{stage_label} params", f"{report[stage_part]['params']:,}")
        table.add_row("DiT params", f"{report['dit']['params']:,}")
        table.add_row("image / latent", f"{config.first_stage.image_size}px / {config.first_stage.embed_dim}x"
                      f"{config.first_stage.latent_size}x{config.first_stage.latent_size}")
        if config.audio is not None:
            audio = config.audio
            table.add_row("audio", f"{audio.seconds:g} s at {audio.sample_rate} Hz as {audio.freq_scale} spectrograms "
                          f"0-{audio.f_max:g} Hz; vocoder: {audio.griffin_lim_iters} Griffin-Lim iterations")
        if isinstance(config.first_stage, VQConfig):
            table.add_row("codebook", f"{config.first_stage.n_embed} x {config.first_stage.embed_dim}")
        else:
            table.add_row("latent scale", f"x{config.first_stage.scaling_factor}"
                          + (f", shift {config.first_stage.shift_factor}" if config.first_stage.shift_factor else ""))
        condition = (f"text ({config.dit.conditioning})" if config.uses_text
                     else f"{config.dit.num_classes} classes")
        table.add_row("DiT", f"depth {config.dit.depth}, width {config.dit.hidden_size}, "
                      f"patch {config.dit.patch_size}, {condition}")
        if not config.uses_text:
            # What `generate --class` takes (its errors send users here): names with their ids.
            names = [f"{i} {name}" for i, name in enumerate(config.class_names)]
            shown = names if len(names) <= _CLASSES_SHOWN else [*names[:_CLASSES_SHOWN // 2],
                                                                 f"... ({len(names)} in all; --json lists every one)"]
            table.add_row("classes (--class)", ", ".join(shown) if names else
                          f"ids 0..{config.dit.num_classes - 1} (the run has no class names)")
        if config.text is not None:
            table.add_row("text encoder", f"depth {config.text.depth}, width {config.text.hidden_size}, "
                          f"vocabulary {config.text.vocab_size}, {config.text.max_length} tokens")
        table.add_row("artifacts", ", ".join(k for k, v in report["artifacts"].items() if v) or "-")
        table.add_row("weights sha256", report["weights_sha256"][:16])
        stdout_console.print(table)
        emit_json(report, json_out)
