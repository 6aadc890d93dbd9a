"""`mmgen train vqvae|dit|all`, and the training helpers `mmgen quickstart` reuses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mmgen_deploy.cli.common import TRAINING_SEED_OPTION, console, emit_json, json_option, positive
from mmgen_deploy.errors import UsageError

if TYPE_CHECKING:
    from mmgen_deploy.rundir import RunDir

train_app = typer.Typer(
    name="train",
    help="Train the VQ-VAE and the DiT on built-in (`shapes`) or user data (a folder of images).\n\n"
         "Stage 1 `vqvae`, stage 2 `dit` (on the stage-1 latents), or `all` for both. Progress bars "
         "show loss and speed; checkpoints land in RUN_DIR/checkpoints (resume with --resume; Ctrl-C "
         "keeps the last complete one); reconstruction/sample grids in RUN_DIR/samples.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

_OUT_HELP = "Run directory to create or continue."


def _load_data(spec: Any, audio: Any = None) -> tuple[Any, Any]:  # (train ImageData, val ImageData)
    from mmgen_deploy.data import load_split

    with console.status(f"loading data ({spec.name})"):
        return load_split(spec, "train", audio=audio), load_split(spec, "val", audio=audio)


@dataclass(frozen=True)
class TextOptions:
    """How the user asked for a text-to-image model (`--text`)."""

    conditioning: str = "pooled+cross_attention"
    holdout_fraction: float = 0.0  # `shapes` only


def _text_options(text: bool, conditioning: str, holdout_fraction: float | None) -> TextOptions | None:
    """Checked before any work; None for a class-conditioned model."""
    from mmgen_deploy.config import DIT_CONDITIONINGS

    if not text:
        if holdout_fraction:
            raise UsageError("--holdout-fraction applies to text-to-image models", "add --text")
        if conditioning != TextOptions.conditioning:
            raise UsageError("--text-conditioning applies to text-to-image models", "add --text")
        return None
    modes = [m for m in DIT_CONDITIONINGS if m != "class"]
    if conditioning not in modes:
        raise UsageError(f"unknown --text-conditioning {conditioning!r}", f"choose one of: {', '.join(modes)}")
    fraction = 0.0 if holdout_fraction is None else holdout_fraction
    if not 0.0 <= fraction <= 0.5:
        raise UsageError(f"--holdout-fraction must be in [0, 0.5], got {fraction}",
                         "0.2 keeps a fifth of the attribute combinations out of training")
    return TextOptions(conditioning=conditioning, holdout_fraction=fraction)


def _check_seed(seed: int) -> None:
    """The training seed in the range every seed is held to (it also seeds NumPy and the data)."""
    from mmgen_deploy.sampling.loop import check_seed

    check_seed(seed)  # the CLI names it --seed (OPTION_NAMES)


def new_run(out: Path, preset_name: str, data: str, image_size: int | None, seed: int, num_train: int | None,
             overwrite: bool, resume: bool, text: TextOptions | None = None) -> tuple[Any, Any, Any]:
    """(RunDir, train data, val data) for a stage-1 run; refuses a run of another model.

    A text-to-image model's tokenizer is built from the training captions first, so the
    run's config gets the vocabulary size it will have.
    """
    from mmgen_deploy.config import (
        DEFAULT_IMAGE_SIZE,
        DEFAULT_SPECTROGRAM_SIZE,
        TextConfig,
        audio_layout,
        preset,
        with_audio,
        with_text,
    )
    from mmgen_deploy.data import DataSpec
    from mmgen_deploy.training import prepare_run

    _check_seed(seed)
    spec = DataSpec.parse(data, image_size=image_size or DEFAULT_IMAGE_SIZE, seed=seed)
    if spec.is_audio and image_size is None:
        spec = DataSpec(**{**spec.to_dict(), "image_size": DEFAULT_SPECTROGRAM_SIZE})
    image_size = spec.image_size
    audio = audio_layout(image_size) if spec.is_audio else None  # checked before the data is made
    if audio is not None and text is not None:
        raise UsageError("--text: audio runs are class-conditioned (their evaluation judges classes)",
                         "leave out --text for audio data")
    if num_train is not None:
        if spec.name not in ("shapes", "tones"):
            raise UsageError("--num-train applies to `shapes` and `tones` only (a folder has the files it has)")
        spec = DataSpec(**{**spec.to_dict(), "num_train": num_train})
    if text is not None and text.holdout_fraction:
        if spec.name != "shapes":
            raise UsageError("--holdout-fraction applies to `shapes` only (it holds out attribute combinations)")
        spec = DataSpec(**{**spec.to_dict(), "holdout_fraction": text.holdout_fraction})
    train, val = _load_data(spec, audio)
    config = preset(preset_name, image_size=image_size, num_classes=len(train.class_names))
    config = config.replace(class_names=tuple(train.class_names))
    if audio is not None:
        config = with_audio(config, audio)
    if text is not None:
        from mmgen_deploy.training.dit import build_tokenizer

        tokenizer = build_tokenizer(train.captions, TextConfig().max_length)
        config = with_text(config, conditioning=text.conditioning, vocab_size=tokenizer.vocab_size,
                           max_length=tokenizer.max_length)
    run = prepare_run(out, config, spec.to_dict(), overwrite=overwrite, resume=resume)
    return run, train, val


def vq_train_settings(recipe: Any, steps: int | None, batch_size: int | None, lr: float | None, seed: int,
                      gan: bool) -> Any:
    """The VQ-VAE stage's settings: the options given, the recipe's values for those left out (None)."""
    from mmgen_deploy.training.vqvae import VQTrainSettings

    _check_seed(seed)
    positive("number of VQ-VAE steps", steps)
    positive("VQ-VAE batch size", batch_size)
    defaults = VQTrainSettings()
    return VQTrainSettings(steps=steps or recipe.vq_steps, batch_size=batch_size or defaults.batch_size,
                           lr=lr or defaults.lr, seed=seed, gan=gan,
                           checkpoint_every=min(defaults.checkpoint_every, steps or recipe.vq_steps))


def dit_train_settings(recipe: Any, steps: int | None, batch_size: int | None, lr: float | None, seed: int) -> Any:
    """The DiT stage's settings: the options given, the recipe's values for those left out (None)."""
    from mmgen_deploy.training.dit import DiTTrainSettings

    _check_seed(seed)
    positive("number of DiT steps", steps)
    positive("DiT batch size", batch_size)
    defaults = DiTTrainSettings()
    return DiTTrainSettings(steps=steps or recipe.dit_steps,
                            batch_size=batch_size or recipe.dit_batch_size or defaults.batch_size,
                            lr=lr or recipe.dit_lr or defaults.lr, seed=seed,
                            text_lr_scale=recipe.text_lr_scale or defaults.text_lr_scale,
                            checkpoint_every=min(defaults.checkpoint_every, steps or recipe.dit_steps))


def _print_vq(result: dict[str, Any]) -> None:
    console.print(f"VQ-VAE: {result['steps']} steps in {result['train_seconds']:.0f} s; validation PSNR "
                  f"[bold]{result['psnr_db']:.2f} dB[/], codebook {result['codes_used']}/{result['codebook_size']} "
                  f"in use ({100 * result['codebook_usage']:.0f}%), perplexity {result['perplexity']:.1f}")


def _print_dit(result: dict[str, Any]) -> None:
    console.print(f"DiT: {result['steps']} steps in {result['train_seconds']:.0f} s; final loss "
                  f"{result['final_loss']:.4f}" + (f"; samples in {result['sample_grid']}"
                                                   if result.get("sample_grid") else ""))


def stage_dit(run: RunDir, train: Any, settings: Any, resume: bool, threads: int | None) -> dict[str, Any]:
    """Train the DiT with the lines `train dit`, `train all` and the quickstart print; returns its report."""
    from mmgen_deploy.training.common import set_threads
    from mmgen_deploy.training.dit import train_dit

    console.print(f"DiT: training on {set_threads(threads)} CPU thread(s)")
    result = train_dit(run, train, settings, resume=resume)
    _print_dit(result)
    return result


def stage_vq(run: RunDir, train: Any, val: Any, settings: Any, resume: bool, threads: int | None) -> dict[str, Any]:
    """Train the VQ-VAE with the lines `train vqvae`, `train all` and the quickstart print; returns its report."""
    from mmgen_deploy.training.common import set_threads
    from mmgen_deploy.training.vqvae import train_vqvae

    console.print(f"VQ-VAE: training on {set_threads(threads)} CPU thread(s)")
    result = train_vqvae(run, train, val, settings, resume=resume)
    _print_vq(result)
    return result


# -- options shared by several commands (and the quickstart: the public ones) ---------------
_data_opt = typer.Option("shapes", "--data", help="`shapes` (built in, procedural) or a folder of images: class "
                         "sub-folders and/or a metadata.jsonl with file_name/text.")
_preset_opt = typer.Option("tiny", "--preset", help="Model preset (tiny, S/2, B/2, ...).")
_size_opt = typer.Option(None, "--image-size", help="Image side in pixels (images are resized and centre-cropped; "
                         "default 32); for audio data the spectrogram's side (32 or 64, default 32).",
                         show_default=False)
_resume_opt = typer.Option(False, "--resume", help="Continue from the last checkpoint in RUN_DIR/checkpoints.")
OVERWRITE_OPTION = typer.Option(False, "--overwrite", help="Replace a run directory that holds a different model.")
_num_train_opt = typer.Option(None, "--num-train", help="Number of generated `shapes` training images.")
_text_opt = typer.Option(False, "--text", help="Train a text-to-image model: a word tokenizer built from the "
                         "captions and a text encoder trained jointly with the DiT (prompts instead of classes).")
_text_cond_opt = typer.Option("pooled+cross_attention", "--text-conditioning",
                              help="With --text: how the DiT sees the prompt: pooled (adaLN), cross_attention "
                                   "(token-level) or pooled+cross_attention.")
_holdout_opt = typer.Option(None, "--holdout-fraction",
                            help="With --text on `shapes`: fraction of the (colour, shape, size, position) "
                                 "combinations kept out of training (default 0); `mmgen eval` prompts come "
                                 "from them.")
_gan_opt = typer.Option(False, "--gan", help="Add a VQGAN-style adversarial patch discriminator.")
TRAIN_THREADS_OPTION = typer.Option(None, "--threads", help="torch CPU threads (default: one per CPU this process may "
                            "use, whatever the load; the count changes the trained weights' last bits and is "
                            "recorded in reports/train_*.json; on a busy machine fewer threads train faster).")


@train_app.command("vqvae")
def train_vqvae_cmd(
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help=_OUT_HELP),
    data: str = _data_opt, preset_name: str = _preset_opt, image_size: int | None = _size_opt,
    seed: int = TRAINING_SEED_OPTION,
    steps: int | None = typer.Option(None, "--steps", help="Optimisation steps (default: the preset's recipe)."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Images per step (default 64)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default 2e-3, cosine decay)."),
    gan: bool = _gan_opt,
    num_train: int | None = _num_train_opt, resume: bool = _resume_opt, overwrite: bool = OVERWRITE_OPTION,
    text: bool = _text_opt, text_conditioning: str = _text_cond_opt, holdout_fraction: float | None = _holdout_opt,
    threads: int | None = TRAIN_THREADS_OPTION,
    json_out: str | None = json_option("the results"),
) -> None:
    """Stage 1: train the VQ-VAE (reconstruction + commitment loss, EMA codebook with dead-code restart).
    Reports validation PSNR and codebook usage/perplexity. With --text the run is created as a
    text-to-image model (the DiT stage then trains the text encoder too)."""
    from mmgen_deploy.training import recipe_for

    settings = vq_train_settings(recipe_for(preset_name, text=text), steps, batch_size, lr, seed, gan)  # checked first
    text_options = _text_options(text, text_conditioning, holdout_fraction)
    from mmgen_deploy.rundir import RunDir

    with RunDir(out).writing("train the VQ-VAE", create=True):
        run, train, val = new_run(out, preset_name, data, image_size, seed, num_train, overwrite, resume,
                                   text_options)
        result = stage_vq(run, train, val, settings, resume, threads)
    console.print(f"weights: {run.weights_path('vqvae')}; report: {run.train_report_path('vqvae')}")
    emit_json(result, json_out)


@train_app.command("dit")
def train_dit_cmd(
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run directory with a trained VQ-VAE."),
    steps: int | None = typer.Option(None, "--steps", help="Optimisation steps (default: the preset's recipe)."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b",
                                          help="Latents per step (default: the preset's recipe; tiny 64, others 128)."),
    lr: float | None = typer.Option(None, "--lr",
                                    help="Peak AdamW learning rate (default: the preset's recipe; tiny 6e-3, "
                                         "others 1e-3). A tiny text run trains its text encoder at 1/6 of it."),
    seed: int = TRAINING_SEED_OPTION, resume: bool = _resume_opt,
    preset_name: str = typer.Option("tiny", "--preset", help="Recipe for the default step count."),
    threads: int | None = TRAIN_THREADS_OPTION,
    data: str | None = typer.Option(None, "--data", help="Imported runs only (`mmgen import`, e.g. a KL "
                                    "autoencoder such as SD's VAE): `shapes` or an image folder to train the "
                                    "run's DiT on, at the autoencoder's image size.", show_default=False),
    json_out: str | None = json_option("the results"),
) -> None:
    """Stage 2: train the DiT on the first stage's latents (cached once): the VQ-VAE's
    pre-quantization latents, or the scaled posterior mean of a KL autoencoder imported with
    `mmgen import` (give it --data). Epsilon
    prediction, linear betas 1e-4..0.02 over 1000 steps, label dropout for classifier-free guidance,
    AdamW, EMA weights saved for inference. For a run created with --text, the word tokenizer is
    built from the captions and saved, and the text encoder trains jointly with the DiT (caption
    dropout to the empty prompt for guidance)."""
    from mmgen_deploy.data import DataSpec, load_split
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.training import recipe_for

    settings = dit_train_settings(recipe_for(preset_name), steps, batch_size, lr, seed)
    run = RunDir(out)
    if data is not None:
        from mmgen_deploy.training.dit import adopt_data

        adopt_data(run, data, seed)
    meta = run.read_meta()
    from mmgen_deploy.models.load import load_first_stage

    load_first_stage(run)  # fails early, with a hint, when stage 1 is missing
    if run.load_config().uses_text:  # a text-to-image run may have its own default length
        settings = dit_train_settings(recipe_for(preset_name, text=True), steps, batch_size, lr, seed)
    if not meta.get("data") or meta["data"].get("source") == "import":
        hint = ("an imported run: give the data to train its DiT on with --data (shapes or a folder)"
                if meta.get("data") else "train the VQ-VAE of this run with `mmgen train vqvae` first")
        raise UsageError(f"{run.run_json} does not describe its training data", hint)
    with console.status("loading data"):
        train = load_split(DataSpec.from_dict(meta["data"]), "train", audio=run.load_config().audio)
    result = stage_dit(run, train, settings, resume, threads)
    console.print(f"weights (EMA): {run.weights_path('dit')}; report: {run.train_report_path('dit')}")
    emit_json(result, json_out)


@train_app.command("all")
def train_all_cmd(
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help=_OUT_HELP),
    data: str = _data_opt, preset_name: str = _preset_opt, image_size: int | None = _size_opt,
    seed: int = TRAINING_SEED_OPTION,
    vq_steps: int | None = typer.Option(None, "--vq-steps", help="VQ-VAE steps (default: the preset's recipe)."),
    dit_steps: int | None = typer.Option(None, "--dit-steps", help="DiT steps (default: the preset's recipe)."),
    gan: bool = _gan_opt,
    num_train: int | None = _num_train_opt, resume: bool = _resume_opt, overwrite: bool = OVERWRITE_OPTION,
    text: bool = _text_opt, text_conditioning: str = _text_cond_opt, holdout_fraction: float | None = _holdout_opt,
    threads: int | None = TRAIN_THREADS_OPTION,
    json_out: str | None = json_option("the results"),
) -> None:
    """Both stages: the VQ-VAE, then the DiT on its latents (with --text: the DiT and a text encoder,
    jointly, on the captions). With --resume, a finished stage is skipped and an unfinished one
    continues from its checkpoint."""
    from mmgen_deploy.training import recipe_for

    recipe = recipe_for(preset_name, text=text)
    vq_settings = vq_train_settings(recipe, vq_steps, None, None, seed, gan)
    dit_settings = dit_train_settings(recipe, dit_steps, None, None, seed)
    text_options = _text_options(text, text_conditioning, holdout_fraction)
    from mmgen_deploy.rundir import RunDir

    with RunDir(out).writing("train", create=True):
        run, train, val = new_run(out, preset_name, data, image_size, seed, num_train, overwrite, resume,
                                   text_options)
        results = _train_both(run, train, val, vq_settings, dit_settings, resume, threads)
    console.print(f"run directory: {run.root}")
    emit_json(results, json_out)


def _stage_done(run: RunDir, part: str, steps: int) -> bool:
    report = run.train_report_path(part)
    if not (run.has_part(part) and report.is_file()):
        return False
    from mmgen_deploy.io_utils import read_json

    return int(read_json(report).get("steps", -1)) == steps


def _train_both(run: RunDir, train: Any, val: Any, vq_settings: Any, dit_settings: Any,
                resume: bool, threads: int | None) -> dict[str, Any]:
    from mmgen_deploy.io_utils import read_json

    results: dict[str, Any] = {}
    vq_checkpoint = run.checkpoint_path("vqvae")
    if resume and _stage_done(run, "vqvae", vq_settings.steps):
        console.print("VQ-VAE already trained; skipping to the DiT")
        results["vqvae"] = read_json(run.train_report_path("vqvae"))
    else:
        results["vqvae"] = stage_vq(run, train, val, vq_settings, resume and vq_checkpoint.is_file(), threads)
        resume = False  # a new VQ-VAE makes any DiT checkpoint stale
    dit_checkpoint = run.checkpoint_path("dit")
    results["dit"] = stage_dit(run, train, dit_settings, resume and dit_checkpoint.is_file(), threads)
    return results


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
