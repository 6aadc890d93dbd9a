"""`mmgen import`: diffusers / official DiT / taming VQ / LDM KL checkpoints -> run directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mmgen_deploy.cli.common import console, emit_json, json_option, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_command(
        source: Path | None = typer.Argument(
            None, help="A diffusers pipeline directory (model_index.json), a diffusers model directory "
                       "(config.json + weights), or a checkpoint file (.pt/.pth/.ckpt/.safetensors).",
            show_default=False),
        out: Path = typer.Option(..., "--out", "-o", help="Run directory to create.", show_default=False),
        vq: Path | None = typer.Option(None, "--vq", help="The VQ model: diffusers VQModel directory or "
                                       "taming/LDM .ckpt.", show_default=False),
        vae: Path | None = typer.Option(None, "--vae", help="The first stage of either kind: a diffusers "
                                        "AutoencoderKL (e.g. sd-vae-ft-ema) or VQModel directory, or an LDM "
                                        "first-stage .ckpt.", show_default=False),
        dit: Path | None = typer.Option(None, "--dit", help="The DiT: diffusers DiTTransformer2DModel directory "
                                        "or official DiT .pt.", show_default=False),
        scheduler: Path | None = typer.Option(None, "--scheduler", help="diffusers scheduler directory or "
                                              "scheduler_config.json (default: the one next to the DiT, if any; "
                                              "else DiT's 1000 linear betas).", show_default=False),
        class_names: Path | None = typer.Option(None, "--class-names", metavar="FILE",
                                                help="One class name per line (default: 'class 0' ...).",
                                                show_default=False),
        image_size: int | None = typer.Option(None, "--image-size", min=1,
                                              help="Image size; must agree with the DiT's latent size "
                                                   "(default: derived from it).", show_default=False),
        num_heads: int | None = typer.Option(None, "--num-heads", min=1,
                                             help="Attention heads of an official DiT whose width is not one of "
                                                  "the paper's (heads are not visible in the tensors).",
                                             show_default=False),
        norm_groups: int | None = typer.Option(None, "--norm-groups", min=1,
                                               help="GroupNorm groups of a taming VQ checkpoint (default 32).",
                                               show_default=False),
        force: bool = typer.Option(False, "--overwrite", "--force", help="Replace an existing non-empty --out "
                                   "directory."),
        json_out: str | None = json_option("the import report"),
    ) -> None:
        """Turn an existing PyTorch model into a run directory that export, build-engine, generate and parity accept.

        A run directory needs a first stage (a VQ model or a KL autoencoder) and a DiT whose latent
        (channels, size) matches the autoencoder's.

        Give a diffusers pipeline (e.g. a DiTPipeline folder: transformer/, vae/, scheduler/, id2label) as
        SOURCE, or the parts with --vae (or --vq) and --dit, e.g. --dit DiT-XL-2-256.pt --vae sd-vae-ft-ema/.

        Loading is safe: safetensors, or torch.load(weights_only=True) with only argparse.Namespace allowed.

        A file that needs anything else is refused without running any of it.
        """
        from mmgen_deploy.importers import import_run

        with console.status("importing..."):
            report = import_run(out, source=source, vq_path=vq, vae_path=vae, dit_path=dit, scheduler_path=scheduler,
                                class_names_file=class_names, image_size=image_size, num_heads=num_heads,
                                norm_groups=norm_groups, overwrite=force)
        if json_out == "-":
            emit_json(report, "-")
            return
        cfg, imported = report["config"], report["imported"]
        table = Table(title=f"imported into {report['run_dir']}")
        table.add_column("part")
        table.add_column("layout")
        table.add_column("architecture")
        vq_cfg, dit_cfg = cfg["vq"], cfg["dit"]
        part = "vae" if cfg.get("first_stage") == "kl" else "vqvae"
        latent = (f"latent {vq_cfg['embed_dim']} channels x{vq_cfg['scaling_factor']}" if part == "vae"
                  else f"codebook {vq_cfg['n_embed']}x{vq_cfg['embed_dim']}")
        table.add_row(part, imported[part]["layout"],
                      f"{vq_cfg['image_size']}px, mult {tuple(vq_cfg['channel_mult'])}, {latent}, "
                      f"{report['params'][part]:,} params")
        table.add_row("dit", imported["dit"]["layout"],
                      f"depth {dit_cfg['depth']}, width {dit_cfg['hidden_size']}, {dit_cfg['num_heads']} heads, "
                      f"patch {dit_cfg['patch_size']}, {dit_cfg['num_classes']} classes, "
                      f"{report['params']['dit']:,} params")
        stdout_console.print(table)
        for note in imported["notes"]:
            console.print(f"- {note}", soft_wrap=True)
        emit_json(report, json_out)
