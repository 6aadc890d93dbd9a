"""The run directory: one folder holds a model and everything derived from it.

    RUN_DIR/
      run.json                    format marker, noise schedule, class names, data description
      vqvae/config.json           VQConfig
      vqvae/model.safetensors     VQ autoencoder weights (incl. EMA codebook statistics)
      vae/config.json             KLConfig, instead of vqvae/ when the first stage is a KL autoencoder
      vae/model.safetensors       (imported: Stable Diffusion's VAE and the like)
      dit/config.json             DiTConfig
      dit/model.safetensors       DiT weights for inference (the EMA copy when trained here)
      text_encoder/               text-to-image models only: config.json (TextConfig),
                                  model.safetensors, tokenizer.json (the word vocabulary)
      checkpoints/                training state for --resume
      onnx/manifest.json          the export manifest
      onnx/<precision>/<component>.onnx
      engines/<runtime>-<version>-<target>/   one engine set (plans + manifest.json)
      samples/
      reports/<kind>[-<what>][-<settings>].json   eval, parity, tune and training reports (`report_path`)
      reports/tune-front.png      the front `mmgen tune` measured, as a plot
      recipe.json                 the configuration `mmgen tune` chose for this machine
      .mmgen.lock                 held (flock) by the command writing into the run, if any

Everything that reads a run directory goes through `RunDir`, which owns this layout (no other
module joins these names) and refuses missing or corrupt pieces with a message naming the file
and how to fix it. It reads and writes the weight files; building the models they fill is
`mmgen_deploy.models.load`'s.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from mmgen_deploy.config import (
    AudioConfig,
    DiffusionConfig,
    DiTConfig,
    KLConfig,
    ModelConfig,
    StudentConfig,
    TextConfig,
    VQConfig,
)
from mmgen_deploy.errors import ConfigError, RunDirBusyError, RunDirError
from mmgen_deploy.io_utils import (
    Leftover,
    LockBusy,
    atomic_path,
    check_write_target,
    exclusive_lock,
    read_json,
    sha256_file_remembered,
    sweep_leftovers,
    write_json,
)

if TYPE_CHECKING:
    # torch is imported only where weights are read or written: reading a run's config
    # (what the ONNX Runtime / TensorRT backends need) must work on a machine without torch.
    import torch

    from mmgen_deploy.specs import ComponentSpec
    from mmgen_deploy.text.tokenizer import WordTokenizer

RUN_FORMAT = "mmgen-run"
RUN_FORMAT_VERSION = 1
MODEL_PARTS = ("vqvae", "dit")
# The folder that holds the first stage, per kind (`ModelConfig.first_stage_kind`): a run has one.
FIRST_STAGE_PARTS = {"vq": "vqvae", "kl": "vae"}
KL_PART = FIRST_STAGE_PARTS["kl"]
TEXT_PART = "text_encoder"
ONNX_MANIFEST_NAME = "manifest.json"
# Every top-level entry a run directory may hold (`train --overwrite` removes exactly these).
# The run's own files; every other entry is a folder.
RUN_FILES = ("run.json", "recipe.json")
RUN_ENTRIES = ("run.json", *MODEL_PARTS, KL_PART, TEXT_PART, "checkpoints", "onnx", "engines", "samples", "reports",
               "recipe.json")
# What of a run a deployment needs: configs, inference weights, exported models and engines.
DEPLOY_ENTRIES = ("run.json", *MODEL_PARTS, KL_PART, "onnx", "engines")


# A safetensors header larger than this is not one this tool wrote or imported (DiT-XL/2's is ~60 kB).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors file's header alone (no tensor is read).

    A file whose header is not a safetensors header, or whose length is not what its header
    describes (a copy cut short, a download that stopped), is refused as corrupt in one line.
    """
    def corrupt(why: str) -> RunDirError:
        return RunDirError(f"corrupt weight file {path}: truncated or damaged ({why})",
                           "restore it from a backup, or re-train / re-import the run")

    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise corrupt(f"{size} bytes, shorter than a safetensors header")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise corrupt(f"its header claims {length} bytes of a {size}-byte file")
            header = json.loads(file.read(length))
    except OSError as exc:
        raise RunDirError(f"cannot read weight file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"its header entry {name!r} has no shape / data_offsets") from None
        shapes[name] = shape
        end = max(end, stop, begin)
    if 8 + length + end != size:
        raise corrupt(f"{size} bytes, its header describes {8 + length + end}")
    return shapes


_SAFE_NAME = re.compile(r"[^A-Za-z0-9.+_-]")


def _setting_word(key: str, value: object) -> str:
    """One setting as a word of a report's file name (see `RunDir.report_path`)."""
    if isinstance(value, bool):
        return key if value else f"no-{key}"
    if isinstance(value, int | float):
        return f"{key}{value:g}"
    if isinstance(value, str) and len(value) <= 24:
        return value
    if (isinstance(value, list | tuple) and value and len(value) <= 8
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        return key + "+".join(f"{v:g}" for v in value)
    text = json.dumps(value, sort_keys=True, default=str)
    return f"{key}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def first_stage_part(config: ModelConfig) -> str:
    """The run-directory part of the model's first stage: vqvae/ or vae/."""
    return FIRST_STAGE_PARTS[config.first_stage_kind]


def _checked_precision(precision: str) -> str:
    from mmgen_deploy.specs import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


LOCK_NAME = ".mmgen.lock"

log = logging.getLogger("mmgen_deploy.rundir")

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _command_line() -> str:
    """This process's command line as a user typed it (`mmgen export RUN`, also for `python -m mmgen_deploy`)."""
    if not sys.argv or not sys.argv[0]:
        return ""
    program = Path(sys.argv[0])
    name = "mmgen" if program.name == "__main__.py" and program.parent.name == "mmgen_deploy" else program.name
    return shlex.join([name, *sys.argv[1:]])


def writes_run(purpose: str, *, create: bool = False) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorate a library function whose first argument is a run directory (path or `RunDir`) it writes
    into: the call holds that run's writer lock (`RunDir.writing`)."""
    import functools

    def decorate(func: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(func)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            target = args[0] if args else next(iter(kwargs.values()))
            run = target if isinstance(target, RunDir) else RunDir(target)  # type: ignore[arg-type]
            with run.writing(purpose, create=create):
                return func(*args, **kwargs)
        return wrapper
    return decorate


class RunDir:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._config_cache: tuple[tuple[Any, ...], ModelConfig] | None = None

    @classmethod
    def of(cls, run: RunLike) -> RunDir:
        """`run` itself when it is a RunDir, else the RunDir of that path."""
        return run if isinstance(run, RunDir) else cls(run)

    # -- layout -----------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def config_path(self, part: str) -> Path:
        return self.root / part / "config.json"

    def weights_path(self, part: str) -> Path:
        return self.root / part / "model.safetensors"

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TEXT_PART / "tokenizer.json"

    @property
    def onnx_dir(self) -> Path:
        return self.root / "onnx"

    @property
    def onnx_manifest_path(self) -> Path:
        return self.onnx_dir / ONNX_MANIFEST_NAME

    @staticmethod
    def onnx_relpath(precision: str, component: str) -> str:
        """A graph's path inside RUN_DIR/onnx/ (as the export manifest records it)."""
        return f"{_checked_precision(precision)}/{component}.onnx"

    def onnx_set_dir(self, precision: str) -> Path:
        """RUN_DIR/onnx/<precision>: where `mmgen export` writes that precision's graphs."""
        return self.onnx_dir / _checked_precision(precision)

    def onnx_path(self, precision: str, component: str) -> Path:
        """Where the exported graph of `component` at `precision` lives (it may not exist yet)."""
        return self.onnx_dir / self.onnx_relpath(precision, component)

    def missing_onnx(self, precision: str, components: tuple[str, ...]) -> list[Path]:
        """The graphs of `components` at `precision` that are not exported."""
        return [path for path in (self.onnx_path(precision, c) for c in components) if not path.is_file()]

    def check_onnx_current(self, manifest: dict[str, Any], onnx_set: str, spec: ComponentSpec) -> None:
        """Refuse (one line) a graph the code cannot use as it stands: one whose manifest entry records
        another interface than its spec (`ComponentSpec.stale_interface`: other tensors, a denoiser part
        cut at another split, as an older mmgen exported them), or whose bytes changed since the export
        (`check_onnx_intact`). Checked before anything is loaded. A graph without a manifest entry
        (hand-made ONNX files) is checked by the backends' own input checks only."""
        files = manifest.get("files") if isinstance(manifest, dict) else None
        entry = files.get(onnx_set, {}).get(spec.name) if isinstance(files, dict) else None
        if isinstance(entry, dict):
            difference = spec.stale_interface(entry)
            if difference is not None:
                raise RunDirError(f"{self.onnx_path(onnx_set, spec.name)} {difference}",
                                  self.stale_graph_hint(spec.name))
        self.check_onnx_intact(manifest, onnx_set, spec.name)

    def stale_graph_hint(self, component: str) -> str:
        """What to do about a graph whose interface is not its spec's (`ComponentSpec.tensor_mismatch`,
        `stale_interface`): export it again, a denoiser part with the other two."""
        from mmgen_deploy.specs import export_word

        return ("it was exported for another model or by an mmgen with another interface; re-export it: "
                f"`mmgen export {self.root} --components {export_word(component)}`")

    def check_onnx_intact(self, manifest: dict[str, Any], onnx_set: str, component: str) -> None:
        """Refuse (one line) a graph, or its external data, whose sha256 differs from what the export
        manifest (`manifest`, as read from `onnx_manifest_path`) records for it: a graph replaced or
        edited after the export (another precision's copied over it, a scaled weight) would otherwise
        run without a word. Every backend that reads the ONNX set, and the engine builder, call this
        before reading a graph. The hashes are remembered while the files are provably unchanged
        (`onnx_files.onnx_sha256`), so only the first open after an export reads the files. A graph
        without a manifest entry (hand-made ONNX files) is not checked."""
        from mmgen_deploy.onnx_files import matches_sha256

        files = manifest.get("files") if isinstance(manifest, dict) else None
        entry = files.get(onnx_set, {}).get(component) if isinstance(files, dict) else None
        recorded = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(recorded, str):
            return
        path = self.onnx_path(onnx_set, component)
        hint = f"re-export: `mmgen export {self.root} --overwrite`"
        try:
            intact = matches_sha256(path, recorded)
        except FileNotFoundError as exc:
            raise RunDirError(str(exc), hint) from None
        if not intact:
            raise RunDirError(f"{path} (or its external data) is not the graph `mmgen export` wrote: its sha256 "
                              f"differs from the export manifest's ({recorded[:12]}...)", hint)

    @property
    def engines_dir(self) -> Path:
        return self.root / "engines"

    def engine_set_dir(self, name: str) -> Path:
        """RUN_DIR/engines/<name>, name = <runtime>-<version>-<target> (see mmgen_deploy.engines)."""
        return self.engines_dir / name

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def report_path(self, kind: str, *labels: str, **settings: object) -> Path:
        """RUN_DIR/reports/<kind>[-<label>...][-<setting>...].json.

        A report is named by what it measured (`labels`: a backend, a precision) and by the
        `settings` it was made with that differ from its command's defaults, so a report made with
        other settings sits beside it instead of replacing its verdict; the same settings replace it.
        A setting reads <key><number> ("steps4", "cfg7.5"; a list of numbers "batches1+3"), its value
        for a string ("ddpm"), <key> / no-<key> for a flag, and <key>-<8 hex digits of its sha256>
        for anything longer (prompts, per-output tolerances)."""
        words = [kind, *labels, *(_setting_word(key, value) for key, value in settings.items())]
        name = "-".join(_SAFE_NAME.sub("_", word) for word in words)
        return self.reports_dir / f"{name}.json"

    def train_report_path(self, part: str) -> Path:
        """RUN_DIR/reports/train_<part>.json: the result of training that part."""
        return self.reports_dir / f"train_{part}.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_path(self, name: str) -> Path:
        """RUN_DIR/checkpoints/<name>.pt: training state for --resume (`vqvae`, `dit`) and caches (`dit_latents`)."""
        return self.checkpoints_dir / f"{name}.pt"

    def distill_pairs_path(self, round_index: int) -> Path:
        """RUN_DIR/checkpoints/distill-pairs-<round>.safetensors: the trajectory pairs of one round of
        `mmgen distill` and the noise, conditions and guidance scales they start from, written once per
        round; the distillation checkpoint names them by round and sha256."""
        return self.checkpoints_dir / f"distill-pairs-{round_index}.safetensors"

    def distill_pairs_files(self) -> list[Path]:
        """Every `distill_pairs_path` present."""
        return sorted(self.checkpoints_dir.glob("distill-pairs-*.safetensors"))

    def tune_reference_path(self, key: str) -> Path:
        """RUN_DIR/checkpoints/tune-reference-<key>.npz: the reference images `mmgen tune` compares with,
        computed once (`key` names what they depend on)."""
        return self.checkpoints_dir / f"tune-reference-{key}.npz"

    @property
    def recipe_path(self) -> Path:
        """RUN_DIR/recipe.json: the configuration `mmgen tune` chose for this machine."""
        return self.root / "recipe.json"

    @property
    def tune_plot_path(self) -> Path:
        """RUN_DIR/reports/tune-front.png: the measured front, plotted."""
        return self.reports_dir / "tune-front.png"

    def onnx_entry_path(self, relpath: str) -> Path:
        """A file the export manifest lists, by its path inside RUN_DIR/onnx/."""
        return self.onnx_dir / relpath

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    # -- state ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.run_json.is_file()

    def is_empty(self) -> bool:
        """No folder, or a folder holding nothing but (maybe) the lock file."""
        return not self.root.exists() or (self.root.is_dir()
                                          and all(p.name == LOCK_NAME for p in self.root.iterdir()))

    # -- one writer at a time -----------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, purpose: str, *, create: bool = False) -> Iterator[list[Leftover]]:
        """Hold the run's writer lock for the duration (`purpose`: what is written, e.g. "export").

        Every command that writes into a run directory (train, import, export, build-engine,
        generate's samples, quickstart) holds it; commands that only read do not. A second
        writer fails at once with `RunDirBusyError` naming the command that holds it. The first
        (outermost) holder in a process then removes what killed writers left behind (temporary
        folders of `atomic_dir` / `atomic_path`: `.onnx.<random>.tmp/`, engine sets, samples,
        the run folder's own siblings made by `mmgen import`), logs one line per item on the
        `mmgen_deploy.rundir` logger, and yields that list. Nested holders in one process
        (quickstart running export) share the lock and yield an empty list.

        `create=True` (train, import) makes the folder when it is missing and removes it again
        if nothing but the lock was put in it; a non-empty folder that is not a run directory
        is left untouched and unlocked (those commands refuse or replace it themselves).
        """
        created = False
        if create:
            if self.root.exists() and not self.root.is_dir():
                if not self.root.is_file():  # a device, FIFO or socket: never replaced by a run
                    check_write_target(self.root, folder=True, label="run directory")
                yield []
                return
            if not self.root.exists():
                sweep_leftovers(self.root.parent, recurse=False, only_target=self.root.name)  # a set-aside copy?
            if not self.root.exists():
                self.root.mkdir(parents=True)
                created = True
            elif not self.exists() and not self.is_empty():
                yield []
                return
        else:
            self._require_run()
        self.check_entries()
        holder = {"pid": os.getpid(), "purpose": purpose, "command": _command_line(),
                  "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            with exclusive_lock(self.lock_path, holder) as outermost:
                cleaned: list[Leftover] = []
                if outermost:
                    cleaned = (sweep_leftovers(self.root.parent, recurse=False, only_target=self.root.name,
                                               ignore=frozenset({LOCK_NAME}))
                               + sweep_leftovers(self.root, ignore=frozenset({LOCK_NAME})))
                    for item in cleaned:
                        log.warning("%s", item.describe())
                yield cleaned
        except LockBusy as busy:
            raise RunDirBusyError(self._busy_message(purpose, busy.holder),
                                  self._busy_hint(busy.holder)) from None
        finally:
            if created and self.is_empty():
                with contextlib.suppress(OSError):
                    self.lock_path.unlink(missing_ok=True)
                    self.root.rmdir()

    def check_entries(self) -> None:
        """Refuse (one line) a run whose own entries (`RUN_ENTRIES`) are links, devices, FIFOs or sockets:
        a writer would follow them out of the run (a run folder received from someone else could point
        `reports/` at a system folder). Every writer calls this: through `writing`, or directly for
        the commands that add a report without the lock (parity, eval). The entries' contents are
        checked where each file is written (`io_utils.atomic_path`)."""
        hint = "replace it with a real folder or file (copy the linked content in, e.g. with `cp -rL`)"
        for name in RUN_ENTRIES:
            check_write_target(self.root / name, folder=name not in RUN_FILES, label="run entry", hint=hint)

    def writing_into(self, target: Path | None, purpose: str) -> contextlib.AbstractContextManager[Any]:
        """`writing(purpose)` when `target` (None: the run's default place) lies inside the run directory;
        no lock for a folder elsewhere."""
        if target is None or Path(target).resolve().is_relative_to(self.root.resolve()):
            return self.writing(purpose)
        return contextlib.nullcontext()

    def _busy_message(self, purpose: str, holder: dict[str, Any]) -> str:
        since = str(holder.get("since", ""))
        when = f" since {since[11:19]}" if len(since) >= 19 else ""
        who = f"pid {holder['pid']}" if "pid" in holder else "another process"
        command = f" `{holder['command']}`" if holder.get("command") else ""
        return (f"cannot {purpose}: {self.root} is being written by another command ({who}{command}, "
                f"{holder.get('purpose', 'writing')}{when})")

    @staticmethod
    def _busy_hint(holder: dict[str, Any]) -> str:
        stop = f", or stop it (kill {holder['pid']})" if "pid" in holder else ""
        return f"wait until it finishes{stop}; commands that only read the run can run alongside"

    def has_part(self, part: str) -> bool:
        return self.config_path(part).is_file() and self.weights_path(part).is_file()

    def _require_run(self) -> dict[str, Any]:
        if self.root.exists() and not self.root.is_dir():
            inside = (self.root.parent / "run.json").is_file()
            raise RunDirError(f"{self.root} is a file, not a run directory",
                              f"give its folder, {self.root.parent}" if inside else
                              "give the run's folder, the one that holds run.json")
        if not self.root.is_dir():
            raise RunDirError(f"run directory {self.root} does not exist",
                              "create one with `mmgen train` or `mmgen quickstart`")
        if not self.run_json.is_file():
            raise RunDirError(f"{self.root} is not an mmgen run directory (no run.json)",
                              "point at a folder made by `mmgen train`, `mmgen quickstart` or `mmgen import`")
        try:
            meta = read_json(self.run_json)
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{self.run_json} is unreadable: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
            raise RunDirError(f"{self.run_json} is not an mmgen run file (format != {RUN_FORMAT!r})")
        if meta.get("format_version", 0) > RUN_FORMAT_VERSION:
            raise RunDirError(f"{self.root} was written by a newer mmgen-deploy "
                              f"(format {meta.get('format_version')})", "upgrade mmgen-deploy")
        return meta

    def read_meta(self) -> dict[str, Any]:
        return self._require_run()

    def update_meta(self, **fields: Any) -> None:
        meta = self._require_run()
        meta.update(fields)
        write_json(self.run_json, meta)

    # -- configs ----------------------------------------------------------------------
    def _config_signature(self) -> tuple[Any, ...]:
        """What the parsed config depends on: the config files' identity, size and modification time
        (files are replaced by rename, so a rewrite is a new inode)."""
        signature: list[Any] = []
        for path in (self.run_json, *(self.config_path(p) for p in (*MODEL_PARTS, KL_PART, TEXT_PART))):
            try:
                stat = path.stat()
            except OSError:
                signature.append(None)
            else:
                signature.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    def load_config(self) -> ModelConfig:
        """The validated model config; parsed once per RunDir while its files stay unchanged."""
        signature = self._config_signature()
        if self._config_cache is not None and self._config_cache[0] == signature:
            return self._config_cache[1]
        config = self._parse_config()
        self._config_cache = (signature, config)
        return config

    def _parse_config(self) -> ModelConfig:
        meta = self._require_run()

        def parse(kind: Any, part: str | None) -> Any:
            """One section, named by the file it came from when it is wrong."""
            where = self.config_path(part) if part else self.run_json
            try:
                return kind.from_dict(self._read_part_config(part) if part else meta.get("diffusion", {}))
            except ConfigError as exc:
                raise RunDirError(f"invalid configuration in {where}: {exc.message}",
                                  exc.hint or "fix the value, or re-create the run") from None

        # A KL first stage lives in vae/ (never beside a vqvae/: import writes one or the other).
        kl_part = FIRST_STAGE_PARTS["kl"]
        stage: VQConfig | KLConfig = (parse(KLConfig, kl_part) if self.config_path(kl_part).is_file()
                                      else parse(VQConfig, "vqvae"))
        dit: DiTConfig = parse(DiTConfig, "dit")
        diffusion: DiffusionConfig = parse(DiffusionConfig, None)
        text: TextConfig | None = parse(TextConfig, TEXT_PART) if dit.uses_text else None
        class_names = meta.get("class_names", ())
        try:
            if not isinstance(class_names, list | tuple):
                raise ConfigError(f"class_names must be a list of strings, got {type(class_names).__name__}")
            student_section = meta.get("student")
            student = StudentConfig.from_dict(student_section) if student_section is not None else None
            audio_section = meta.get("audio")
            audio = AudioConfig.from_dict(audio_section) if audio_section is not None else None
            cfg = ModelConfig(first_stage=stage, dit=dit, diffusion=diffusion, class_names=tuple(class_names),
                              text=text, student=student, audio=audio)
            cfg.validate()
        except ConfigError as exc:
            raise RunDirError(f"invalid configuration in {self.root}: {exc.message}", exc.hint) from None
        return cfg

    def _read_part_config(self, part: str) -> dict[str, Any]:
        path = self.config_path(part)
        if not path.is_file():
            hint = {"dit": "train the dit stage first (`mmgen train dit`)",
                    TEXT_PART: "train the DiT, which trains its text encoder (`mmgen train dit`)"}
            raise RunDirError(f"missing {path}", hint.get(part, "train the VQ-VAE first (`mmgen train vqvae`)"))
        try:
            data = read_json(path)
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{path} is unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{path} must hold a JSON object")
        return data

    def initialize(self, config: ModelConfig, *, data: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> None:
        """Write run.json and both part configs (no weights yet)."""
        config.validate()
        self.root.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            "diffusion": config.diffusion.to_dict(),
            "class_names": list(config.class_names),
            "data": data or {},
        }
        if config.student is not None:
            meta["student"] = config.student.to_dict()
        if config.audio is not None:
            meta["audio"] = config.audio.to_dict()
        meta.update(extra or {})
        write_json(self.config_path(first_stage_part(config)), config.first_stage.to_dict())
        write_json(self.config_path("dit"), config.dit.to_dict())
        if config.text is not None:
            write_json(self.config_path(TEXT_PART), config.text.to_dict())
        write_json(self.run_json, meta)

    # -- weights ----------------------------------------------------------------------
    def save_weights(self, part: str, model: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with atomic_path(self.weights_path(part)) as tmp:
            # One metadata entry: safetensors writes its metadata map in a per-process random order,
            # so two entries would make the same weights hash differently from one save to the next.
            save_file(state, str(tmp), metadata={"mmgen": f"{RUN_FORMAT}/{part}"})

    def load_state(self, part: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.weights_path(part)
        if not path.is_file():
            raise RunDirError(f"missing weight file {path}",
                              f"train it (`mmgen train {'vqvae' if part == 'vqvae' else 'dit'}`) "
                              "or restore the file")
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise RunDirError(f"corrupt weight file {path}: {str(exc).splitlines()[0]}",
                              "re-train or restore the file from a backup") from None

    def check_weight_files(self) -> None:
        """Refuse a weight file that is truncated or corrupt (from its header and length; nothing is loaded)."""
        for part in self.model_parts():
            path = self.weights_path(part)
            if not path.is_file():
                raise RunDirError(f"missing weight file {path}", "restore the file, or re-train / re-import the run")
            safetensors_shapes(path)

    def load_weights_into(self, part: str, model: torch.nn.Module) -> None:
        """Fill `model` from the part's weight file, refusing one that does not fit it."""
        state = self.load_state(part)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a tensor of the wrong shape
            raise RunDirError(f"{self.weights_path(part)} does not fit its config: "
                              f"{str(exc).splitlines()[-1].strip()}") from None
        problems = []
        if result.missing_keys:
            problems.append(f"missing {', '.join(result.missing_keys[:5])}")
        if result.unexpected_keys:
            problems.append(f"unexpected {', '.join(result.unexpected_keys[:5])}")
        if problems:
            raise RunDirError(f"{self.weights_path(part)} does not match its config.json: "
                              + "; ".join(problems))

    def save_tokenizer(self, tokenizer: WordTokenizer) -> None:
        tokenizer.save(self.tokenizer_path)

    def load_tokenizer(self) -> WordTokenizer:
        from mmgen_deploy.text.tokenizer import WordTokenizer

        return WordTokenizer.load(self.tokenizer_path)

    def model_parts(self, config: ModelConfig | None = None) -> tuple[str, ...]:
        """The weight-holding parts of this run: vqvae (or vae), dit (and text_encoder for text models)."""
        config = config or self.load_config()
        parts = (first_stage_part(config), "dit")
        return (*parts, TEXT_PART) if config.uses_text else parts

    def weights_sha256(self) -> str:
        """One hash over the weight files (and tokenizer): identifies the checkpoint artifacts derive from."""
        digest = hashlib.sha256()
        parts = self.model_parts()
        for part in parts:
            path = self.weights_path(part)
            if not path.is_file():
                raise RunDirError(f"missing weight file {path}")
            digest.update(part.encode())
            digest.update(sha256_file_remembered(path).encode())
        if TEXT_PART in parts:
            if not self.tokenizer_path.is_file():
                raise RunDirError(f"missing tokenizer {self.tokenizer_path}")
            digest.update(sha256_file_remembered(self.tokenizer_path).encode())
        return digest.hexdigest()


def save_run(root: str | os.PathLike[str], config: ModelConfig, vq: torch.nn.Module, dit: torch.nn.Module,
             data: dict[str, Any] | None = None, *, text_encoder: torch.nn.Module | None = None,
             tokenizer: WordTokenizer | None = None) -> RunDir:
    """Create (or refresh) a complete run directory from in-memory models (the first stage `vq` of either
    kind, the DiT and, for a text-to-image model, the text encoder and tokenizer)."""
    if config.uses_text and (text_encoder is None or tokenizer is None):
        raise ValueError("a text-conditioned model needs its text encoder and tokenizer")
    run = RunDir(root)
    run.initialize(config, data=data)
    run.save_weights(first_stage_part(config), vq)
    run.save_weights("dit", dit)
    if text_encoder is not None and tokenizer is not None:
        run.save_weights(TEXT_PART, text_encoder)
        run.save_tokenizer(tokenizer)
    return run


RunLike = str | os.PathLike[str] | RunDir  # what functions taking a run accept (see RunDir.of)
