"""Shared CLI plumbing: consoles, the --debug state, JSON output."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import MMGenError
from mmgen_deploy.runtime.backends import backend_help, backend_labels, precision_help

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig

# Human-readable output goes to stderr so that `--json -` style output on stdout stays clean.
# No emoji codes: user text such as the cache policy `every:x:` or a path `a:smile:b` is printed as written.
console = Console(stderr=True, highlight=False, emoji=False)
# Tables and results: the terminal's width, 80 columns in a pipe or a log file (the tables are laid
# out to fit 80; `--json` has every number in full).
stdout_console = Console(highlight=False, emoji=False)


class _State:
    debug: bool = False


state = _State()


class _ConsoleHandler(logging.Handler):
    """The library's log lines (e.g. leftovers removed from a run directory) as `note:` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        console.print(f"[yellow]note:[/] {escape(record.getMessage())}", soft_wrap=True)


def install_log_handler() -> None:
    """Show the library's warnings (logger `mmgen_deploy`) on the CLI console, once per process."""
    logger = logging.getLogger("mmgen_deploy")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler(logging.WARNING))
        logger.propagate = False


# Old spellings that still parse, for one release, but no longer show in `--help`: the option's
# canonical (first long) name -> the spellings it hides. Keyed by the canonical name, so `-c` stays
# visible as `--class` and hidden only where it still means `--components`.
OLD_SPELLINGS: dict[str, tuple[str, ...]] = {
    "--batch-sizes": ("--batch",),          # bench, parity: the batch sizes measured
    "--batch-profile": ("--batch",),        # build-engine: MIN:OPT:MAX
    "--backend": ("--backends",),           # bench took a plural
    "--precision": ("--precisions", "-p"),  # bench took a plural; export's -p (-p is --prompt)
    "--components": ("--component", "-c"),  # build-engine's singular; -c is --class
    "--overwrite": ("--force",),            # import
    "--rebuild": ("--force",),              # build-engine
}


@dataclass(frozen=True)
class SharedOption:
    """What an option that several commands take means, in every one of them."""

    meaning: str
    value: str | None  # the metavar `--help` shows; None for a flag
    short: str | None = None


# Every option that more than one command takes: one name, one kind of value, one short flag, one
# meaning (tests/test_cli_help.py walks every command against this table; docs/cli.md prints it).
SHARED_OPTIONS: dict[str, SharedOption] = {
    "--json": SharedOption("write the command's results as JSON to FILE ('-' = stdout)", "FILE"),
    "--out": SharedOption("where the command writes: a run directory, an image folder or a repository",
                          "PATH", "-o"),
    "--overwrite": SharedOption("replace what is already at the destination instead of refusing", None),
    # The names each option takes come from their owners (specs, the runtime), in each command's --help.
    "--backend": SharedOption("the inference backend, or auto: the fastest available (bench, tune: a list)",
                              "TEXT"),
    "--precision": SharedOption("which precision runs: an exported ONNX / engine set, or bf16 on the FP32 set "
                                "(export, bench, tune: a list)", "TEXT"),
    "--components": SharedOption("only these components (repeat or comma-separate)", "TEXT"),
    "--threads": SharedOption("CPU threads of the work (left out: the backend's or torch's default; export: "
                              "its own per component)", "INTEGER"),
    "--batch-size": SharedOption("images per model call: per denoiser call when sampling, per optimisation "
                                 "step when training", "INTEGER", "-b"),
    "--batch-sizes": SharedOption("the batch sizes measured, comma-separated", "TEXT"),
    "--steps": SharedOption("how many steps: denoising steps when sampling, optimisation steps in train",
                            "INTEGER"),
    "--sampler": SharedOption("the sampler", "TEXT"),
    "--samplers": SharedOption("the samplers requests may ask for: all, or a comma list", "TEXT"),
    "--cfg-scale": SharedOption("classifier-free guidance scale (1 = off, 0 = unconditional)", "FLOAT"),
    "--seed": SharedOption("the seed; its --help says exactly what it makes repeatable", "INTEGER"),
    "--recipe": SharedOption("take the backend and sampling settings from RUN_DIR/recipe.json (`mmgen tune`)",
                             None),
    "--cache": SharedOption("step caching: none, every:N or adaptive:T (needs the denoiser's parts)", "POLICY"),
    "--class": SharedOption("a class to sample, by name or id (repeatable)", "TEXT", "-c"),
    "--prompt": SharedOption("text-to-image runs: a prompt (repeatable)", "TEXT", "-p"),
    "--prompts-file": SharedOption("text-to-image runs: a file of prompts, one per line", "PATH"),
    "--n": SharedOption("images per class or prompt", "INTEGER", "-n"),
    "--verbose": SharedOption("echo the underlying tool's log (TensorRT, Triton)", None, "-v"),
    "--data": SharedOption("training data: shapes, tones, or a folder of images or WAV files", "TEXT"),
    "--preset": SharedOption("the model preset and its training recipe (tiny, S/2, B/2, ...)", "TEXT"),
    "--image-size": SharedOption("image side in pixels", "INTEGER"),
    "--resume": SharedOption("continue from the run's last checkpoint", None),
    "--lr": SharedOption("peak learning rate", "FLOAT"),
    "--gan": SharedOption("add a VQGAN-style adversarial patch discriminator", None),
    "--num-train": SharedOption("number of generated shapes training images", "INTEGER"),
    "--text": SharedOption("a text-to-image model instead of a class-conditioned one", None),
    "--text-conditioning": SharedOption("how the DiT sees the prompt: pooled, cross_attention or both", "TEXT"),
    "--holdout-fraction": SharedOption("fraction of shapes' attribute combinations kept out of training",
                                       "FLOAT"),
    "--max-batch": SharedOption("most images Triton merges into one sampling batch", "INTEGER"),
    "--instances": SharedOption("model instances (parallel sampling loops) per server", "INTEGER"),
    "--max-queue-delay-us": SharedOption("how long the dynamic batcher waits to fill a batch", "INTEGER"),
}


def shared_options_markdown(uses: dict[str, list[str]]) -> str:
    """The docs table of `SHARED_OPTIONS`; `uses`: option -> the commands that take it."""
    lines = ["| option | value | meaning | commands |", "|---|---|---|---|"]
    for name, option in SHARED_OPTIONS.items():
        spelled = f"`{option.short}`, `{name}`" if option.short else f"`{name}`"
        lines.append(f"| {spelled} | {option.value or '(flag)'} | {option.meaning} | "
                     f"{', '.join(uses.get(name, []))} |")
    return "\n".join(lines) + "\n"


# Hidden options kept for old scripts whose meaning a visible option took over (with more): old -> new.
SUPERSEDED_OPTIONS: dict[str, str] = {
    "--torch-threads": "--threads",  # parity: the reference's threads; --threads sets the backend's too
}


def hide_old_spellings(param: Any) -> None:
    """Keep `OLD_SPELLINGS` of a Click option parsing, but out of its help line."""
    names = [*param.opts, *param.secondary_opts]
    canonical = next((n for n in names if n.startswith("--")), None)
    hidden = set(OLD_SPELLINGS.get(canonical or "", ())) & set(names)
    if not hidden:
        return
    visible_help = type(param).get_help_record

    def help_record(ctx: Any) -> Any:
        opts, secondary = param.opts, param.secondary_opts
        param.opts = [n for n in opts if n not in hidden]
        param.secondary_opts = [n for n in secondary if n not in hidden]
        try:
            return visible_help(param, ctx)
        finally:
            param.opts, param.secondary_opts = opts, secondary

    param.get_help_record = help_record


def old_spellings_in(command: Any, args: list[str]) -> list[tuple[str, str]]:
    """(old, new) for each old spelling `args` use with the subcommand of `command` they invoke,
    so that the CLI can say what to write instead while the old one still works."""
    position = 0
    while getattr(command, "commands", None):  # descend to the subcommand the arguments name
        names = [a for a in args[position:] if not a.startswith("-")]
        sub = command.commands.get(names[0]) if names else None
        if sub is None:
            return []
        position = args.index(names[0], position) + 1
        command = sub
    used = {arg.split("=", 1)[0] for arg in args[position:]}
    found = []
    for param in command.params:
        names = [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())]
        canonical = next((n for n in names if n.startswith("--")), "")
        found += [(old, canonical) for old in OLD_SPELLINGS.get(canonical, ()) if old in names and old in used]
        found += [(name, SUPERSEDED_OPTIONS[name]) for name in names if name in SUPERSEDED_OPTIONS and name in used]
    return found


def visible_names(param: Any) -> list[str]:
    """An option's spellings as `--help` shows them (old spellings left out)."""
    names = [*param.opts, *param.secondary_opts]
    canonical = next((n for n in names if n.startswith("--")), "")
    return [n for n in names if n not in OLD_SPELLINGS.get(canonical, ())]


def plural(count: int, noun: str) -> str:
    """`1 image`, `2 images`, `0 images`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def sample_noun(config: ModelConfig) -> str:
    """What the CLI calls one sample of a run in its lines: a clip for an audio run (its files are WAVs),
    an image otherwise."""
    return {"audio": "clip", "image": "image"}[config.modality]


def count_column() -> Any:
    """A progress bar's `done/total` column that stays empty while the total is unknown (not `0/None`)."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class _Count(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}")

    return _Count()


def positive(what: str, value: int | None) -> None:
    """Refuse a count that must be >= 1 (None: left out, the library's default)."""
    if value is not None and value <= 0:
        from mmgen_deploy.errors import UsageError

        raise UsageError(f"the {what} must be positive, got {value}", "pass a number >= 1")


# The command-line words for the library's argument names: an error about an argument names it by
# parameter (`MMGenError.params`), and the CLI shows the option a user typed instead (`describe_error`).
OPTION_NAMES: dict[str, str] = {
    "n": "--n", "steps": "--steps", "sampler": "--sampler", "cfg_scale": "--cfg-scale", "eta": "--eta",
    "batch_size": "--batch-size", "seed": "--seed", "threads": "--threads", "out": "--out",
    "classes": "--class", "prompts": "--prompt", "prompts_file": "--prompts-file",
    # triton-repo / serve (RepositoryOptions)
    "max_batch_size": "--max-batch", "instances": "--instances", "instance_kind": "--instance-kind",
    "max_queue_delay_us": "--max-queue-delay-us", "artifacts": "--artifacts", "default_steps": "--steps",
    "max_steps": "--max-steps", "default_cfg_scale": "--cfg-scale", "max_cfg_scale": "max cfg scale",
    "samplers": "--samplers", "layout": "--layout", "component_backend": "--component-backend",
    "cache": "--cache",
    # export (QuantSettings)
    "calibration_size": "--calibration-size", "calibration_timesteps": "--calibration-timesteps",
    "component_precisions": "--component-precision",
    "calibration": "--calibration", "calibration_images": "--calibration-images", "components": "--components",
    # backends, runners and engines
    "backend": "--backend", "precision": "--precision", "device": "--device", "debug": "--debug",
    "batch_profile": "--batch-profile", "workspace_bytes": "--workspace", "runtime": "--runtime",
    "compute_capabilities": "--compute-capability", "verbose": "--verbose",
    "opset": "--opset", "ready_timeout_s": "--ready-timeout",
    # train, distill, import
    "data": "--data", "allow_untrained": "--allow-untrained", "ray_address": "--ray",
    "vq_path": "--vq", "vae_path": "--vae", "dit_path": "--dit", "image_size": "--image-size",
    "class_names_file": "--class-names", "num_heads": "--num-heads",
    "resume": "--resume", "overwrite": "--overwrite", "guidance_range": "--guidance-range",
    "trajectories": "--trajectories", "train_steps": "--train-steps",
    # tune
    "max_quality_drop": "--max-quality-drop", "budget_minutes": "--budget-minutes", "samples": "--samples",
    "student": "--student", "batch_sizes": "--batch-sizes",
}


def describe_error(exc: MMGenError) -> str:
    """The one line the CLI prints for `exc`, in the CLI's words."""
    return exc.describe(OPTION_NAMES)


def split_list(values: list[str] | None) -> list[str]:
    """A repeatable option's values with comma lists split (`-c a,b -c d` = `-c a -c b -c d`), blanks dropped."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def json_option(what: str) -> Any:
    """The `--json FILE` option of a command that writes `what` as JSON (`-`: stdout, for pipes);
    one definition, so every command spells and explains it the same way (written by `emit_json`)."""
    return typer.Option(None, "--json", metavar="FILE", help=f"Write {what} as JSON to FILE ('-' = stdout).",
                        callback=checked_json_destination)


_JSON_HINT = "give a new or regular file ('-' writes to stdout)"


def checked_json_destination(destination: str | None) -> str | None:
    """Refuse a --json FILE that is a link, device, FIFO or socket before the command does any work
    (`/dev/stdout` is a link: '-' says stdout)."""
    if destination is not None and destination != "-":
        from mmgen_deploy.io_utils import check_write_target

        check_write_target(destination, label="--json", hint=_JSON_HINT)
    return destination


def emit_json(data: Any, destination: str | None) -> None:
    """Write `data` as JSON to a file, or to stdout when destination is "-"."""
    if destination is None:
        return
    text = json.dumps(data, indent=2, default=str)
    if destination == "-":
        sys.stdout.write(text + "\n")
    else:
        from mmgen_deploy.io_utils import atomic_path

        checked_json_destination(destination)
        with atomic_path(destination) as tmp:
            tmp.write_text(text + "\n")


# The conditioning options, defined once so that `generate` and `client` (and any command that
# takes classes or prompts) spell and explain them the same way.
CLASS_OPTION = typer.Option(
    [], "--class", "-c",
    help="Class to sample, by name (\"red circle\") or id (3). Repeatable. Default: every class.")
PROMPT_OPTION = typer.Option(
    [], "--prompt", "-p",
    help="Text-to-image models: a prompt, e.g. \"a large blue triangle at the top\". Repeatable.")
PROMPTS_FILE_OPTION = typer.Option(
    None, "--prompts-file", help="Text-to-image models: a UTF-8 file with one prompt per line (blank lines "
                                 "skipped); adds to --prompt.")


# What --seed makes repeatable, said once for the commands that sample and once for training, so that
# every command promises exactly the same thing.
SAMPLING_SEED_HELP = (
    "Seed of the noise, 0..2^63-1: image k (counting the classes or prompts in the order given, --n each) "
    "draws its initial noise, and the per-step noise of ddpm or --eta > 0, from (SEED, k), whatever the "
    "batch size. The same seed, conditions in the same order and settings give the same images: "
    "bit-identical on the same backend, precision, device and thread count; within rounding on another.")
TRAINING_SEED_HELP = (
    "Seed of the training data, the initial weights and the batch order. The same seed trains the same model "
    "on the same machine, torch version and thread count (--threads): another thread count rounds the sums "
    "differently and so trains other weights.")


def sampling_seed_option(also: str = "") -> Any:
    """The `--seed` of a command that samples (`also`: what else that command draws from it)."""
    return typer.Option(0, "--seed", help=f"{SAMPLING_SEED_HELP} {also}".strip())


TRAINING_SEED_OPTION = typer.Option(0, "--seed", help=TRAINING_SEED_HELP)


def threads_option(also: str = "") -> Any:
    """The `--threads` of a command that runs a backend (>= 1; left out: the backend's default); `also`:
    what else it sets in that command."""
    return typer.Option(None, "--threads", min=1, help=f"CPU threads for {backend_labels('cpu')} (default: the "
                                                        f"backend's own). {also}".strip())


# CPU threads of the backend a command runs on (generate, eval, bench, tune).
THREADS_OPTION = threads_option()


# The step-caching policy of every command that samples (generate, eval, parity, bench, batch), one word
# everywhere (`sampling.cache`); any policy but none needs the run's denoiser parts.
# Left out, the sampling settings are the run's own: `defaults.SAMPLING`, or a distilled student's
# steps, sampler and default guidance scale (`mmgen distill`).
STEPS_OPTION = typer.Option(
    None, "--steps", show_default=False,
    help=f"Denoising steps (respaced from the training schedule). Default: {SAMPLING.steps}, or a distilled "
         "student's own.")
SAMPLER_OPTION = typer.Option(
    None, "--sampler", show_default=False,
    help=f"ddim, ddpm or dpmpp-2m (DPM-Solver++ 2M). Default: {SAMPLING.sampler}, or a distilled student's own.")
CFG_SCALE_OPTION = typer.Option(
    None, "--cfg-scale", show_default=False,
    help=f"Classifier-free guidance scale in 0..{SAMPLING.max_cfg_scale:g}; 1 disables guidance, 0 is "
         f"unconditional. Default: {SAMPLING.cfg_scale:g} (a distilled student takes it as an input, within "
         "its distilled range).")
_CACHE_POLICIES_HELP = (
    "none; every:N (compute the denoiser's blocks on every N-th step and the first and last, reuse their "
    "contribution in between); adaptive:T (recompute when the first block's timestep-modulated input has changed "
    "by a relative L1 of T since the last recompute)")
_CACHE_PARTS_HELP = "Any policy but none needs `mmgen export --components denoiser_parts`."
CACHE_OPTION = typer.Option(
    SAMPLING.cache, "--cache", metavar="POLICY",
    help=f"Step caching: {_CACHE_POLICIES_HELP}. {_CACHE_PARTS_HELP}")
# triton-repo and serve: the policy of requests that send none (requests may ask for any policy the
# served run's parts allow); client: what its requests ask for.
SERVED_CACHE_OPTION = typer.Option(
    SAMPLING.cache, "--cache", metavar="POLICY",
    help=f"Step caching of requests that send no policy: {_CACHE_POLICIES_HELP}. Requests may ask for any "
         f"policy when the run has the denoiser's parts. {_CACHE_PARTS_HELP}")
CLIENT_CACHE_OPTION = typer.Option(
    None, "--cache", metavar="POLICY", show_default=False,
    help=f"Step caching the server runs for these images: {_CACHE_POLICIES_HELP}. Default: the server's. "
         "The server needs the run's denoiser parts for any policy but none.")


# How a command that samples picks its backend and precision (`generate`, `batch`; `open_runner`
# resolves both), defined once so that both accept and explain the same values.
BACKEND_OPTION = typer.Option("auto", "--backend", help=backend_help())
PRECISION_OPTION = typer.Option(None, "--precision", help=precision_help())


# `--recipe`: the settings come from RUN_DIR/recipe.json (`mmgen tune`). An option the recipe sets, given
# on the command line as well, is refused rather than merged: a recipe's timing and quality hold only for
# the configuration it measured, so a silent override would keep the recipe's name on something else.
RECIPE_OPTION = typer.Option(
    False, "--recipe",
    help="Take the backend, precision, sampler, steps, guidance, cache, batch size and threads from "
         "RUN_DIR/recipe.json (`mmgen tune`); refused when measured on another machine or for changed "
         "artifacts, and when one of those options is given too.")


def refuse_recipe_conflicts(ctx: typer.Context, params: dict[str, str]) -> None:
    """With --recipe, refuse every option in `params` (parameter name -> option) given on the command line."""
    from typer._click.core import ParameterSource

    given = [option for name, option in params.items()
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    if given:
        from mmgen_deploy.errors import UsageError

        raise UsageError(f"--recipe sets {', '.join(given)}: give either the recipe or the option",
                         "drop --recipe, or leave those options out (re-run `mmgen tune` to change the recipe)")
