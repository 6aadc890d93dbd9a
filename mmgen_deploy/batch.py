"""Offline generation from a JSONL file of requests, in-process or over a Ray cluster (`mmgen batch`).

    REQUESTS.jsonl   one JSON object per line:
                     {"class": "red circle", "n": 3, "seed": 11}         (class models: a name or an id)
                     {"prompt": "a small red circle", "n": 2, "seed": 4, "steps": 20, "cfg_scale": 3.0}
                     optional: n (1), seed (0), steps, cfg_scale, sampler (the command's, else the run's own);
                     n is at most SAMPLING.max_images_per_line, the file at most SAMPLING.max_batch_images
                     images (`defaults`): each image is one job held in memory until it is written
    OUT/
      .mmgen.lock      held (flock) by the batch writing into OUT: a second one into the same OUT is refused
      batch.json       the run (path, weights hash) and settings the images were made with
      manifest.jsonl   one line per image written: file, request line, index, seed, condition, settings
      images/          LLLLL_KKKK_<class-or-prompt>.png: image KKKK of request line LLLLL (an audio
                       run: .wav, the settings in its INFO chunk)

Line L expands into the images `mmgen generate RUN --class C --n N --seed S` (or `--prompt`) writes:
image k draws its noise from default_rng([S, k]), so it is the same image whichever worker makes it
and whatever it is batched with. The PNGs carry generate's text chunks.

Resumable: an image is in the manifest only after its PNG was renamed into place, and a rerun
skips every image the manifest holds (and whose file exists), so an interrupted run continues
where it stopped and a finished one writes nothing.

With Ray (`ray_address`, "local" starts a Ray on this machine), the images become a Ray Dataset
processed by `map_batches` with a pool of actors, each holding one runner (one GPU each where
the cluster has GPUs); the driver appends the manifest as results stream back. The run
directory and OUT must be visible at the same path on every node (a shared file system).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import MMGenError, NotAvailableError, OutputBusyError, UsageError
from mmgen_deploy.sampling.requests import ImageSpec

if TYPE_CHECKING:
    from mmgen_deploy.rundir import RunDir

MANIFEST = "manifest.jsonl"
BATCH_INFO = "batch.json"
IMAGES = "images"
LOCK = ".mmgen.lock"
_FIELDS = ("class", "prompt", "n", "seed", "steps", "cfg_scale", "sampler")


def _quoted(key: str) -> str:
    """A request line's key as its JSON spells it: every error about a line quotes the keys it names."""
    return json.dumps(key)


# How a request line names the sampling arguments that errors name by their parameter names.
REQUEST_KEYS = {"classes": _quoted("class"), "prompts": _quoted("prompt"),
                "prompts_file": f"{_quoted('prompt')} lines in",
                **{name: _quoted(name) for name in ("n", "seed", "steps", "cfg_scale", "sampler")}}


@dataclass(frozen=True)
class BatchSettings:
    """Defaults for request lines that leave a setting out, and how the images are computed."""

    # None: the run's own (`sampling.loop.run_sampling_defaults`: a distilled student's, otherwise
    # `defaults.SAMPLING`); `for_run` fills them in.
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    batch_size: int = SAMPLING.batch_size
    cache: str = SAMPLING.cache  # step-caching policy of every image (sampling.cache)

    def for_run(self, config: Any) -> BatchSettings:
        """These settings with the sampling settings left out taken from the run; a distilled student
        refuses given ones it was not trained for (naming them as settings, not as a request's keys)."""
        from mmgen_deploy.sampling.loop import check_student_settings, run_sampling_defaults

        own = run_sampling_defaults(config)
        filled = replace(self, steps=int(own["steps"]) if self.steps is None else self.steps,
                         cfg_scale=float(own["cfg_scale"]) if self.cfg_scale is None else self.cfg_scale,
                         sampler=str(own["sampler"]) if self.sampler is None else self.sampler)
        assert filled.steps is not None and filled.cfg_scale is not None and filled.sampler is not None
        check_student_settings(config, steps=filled.steps, sampler=filled.sampler, cfg_scale=filled.cfg_scale,
                               eta=SAMPLING.eta)
        return filled


@dataclass(frozen=True)
class BatchJob:
    """One image to write: where, and the ImageSpec that makes it."""

    key: str  # "L:K": request line L (1-based), image K
    line: int
    file: str  # relative to OUT
    seed: int
    index: int
    steps: int
    cfg_scale: float
    sampler: str
    class_id: int = -1  # class models
    class_name: str = ""
    prompt: str = ""  # text models
    cache: str = SAMPLING.cache

    def spec(self) -> ImageSpec:
        return ImageSpec(seed=self.seed, index=self.index, class_id=None if self.class_id < 0 else self.class_id,
                         prompt=self.prompt if self.class_id < 0 else None, steps=self.steps,
                         cfg_scale=self.cfg_scale, sampler=self.sampler, cache=self.cache)


@dataclass
class BatchReport:
    total: int  # images the requests describe
    skipped: int  # already in the manifest
    written: int = 0
    seconds: float = 0.0
    # Until the first batch came back: Ray start, actor start, runner loading, first batch.
    first_batch_seconds: float = 0.0
    first_batch_images: int = 0
    workers: int = 1
    ray: str | None = None
    out: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """After the first batch: what the workers sustain once started."""
        rest = self.seconds - self.first_batch_seconds
        return (self.written - self.first_batch_images) / rest if rest > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second,
                "steady_images_per_second": self.steady_images_per_second}


def read_requests(path: Path, config: Any, settings: BatchSettings) -> list[BatchJob]:
    """Expand REQUESTS.jsonl into one job per image; a bad line is refused naming its number."""
    from mmgen_deploy.sampling.conditioning import class_name
    from mmgen_deploy.sampling.files import image_entry
    from mmgen_deploy.sampling.loop import check_sampling_numbers
    from mmgen_deploy.sampling.requests import check_specs, expand_conditions

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"requests file {path} does not exist",
                         'write one JSON object per line, e.g. {"class": "red circle", "n": 3, "seed": 11}') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read requests file {path}: {exc}") from None
    settings = settings.for_run(config)
    assert settings.steps is not None and settings.cfg_scale is not None and settings.sampler is not None
    jobs: list[BatchJob] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            request = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where} is not JSON ({exc.msg})", 'e.g. {"class": "red circle", "n": 3}') from None
        if not isinstance(request, dict):
            raise UsageError(f"{where} is not a JSON object", 'e.g. {"prompt": "a small red circle", "n": 2}')
        unknown = sorted(set(request) - set(_FIELDS))
        if unknown:
            raise UsageError(f"{where}: unknown key{'' if len(unknown) == 1 else 's'} "
                             f"{', '.join(map(_quoted, unknown))}", f"use {', '.join(map(_quoted, _FIELDS))}")
        try:
            n, seed = _integer(request, "n", 1), _integer(request, "seed", 0)
            steps = _integer(request, "steps", settings.steps)
            cfg_scale = request.get("cfg_scale", settings.cfg_scale)
            sampler = request.get("sampler", settings.sampler)
            if not isinstance(cfg_scale, (int, float)) or isinstance(cfg_scale, bool):
                raise UsageError(f"{{cfg_scale}} must be a number, got {cfg_scale!r}", params=["cfg_scale"])
            if not isinstance(sampler, str):
                raise UsageError(f"{{sampler}} must be a string, got {sampler!r}", params=["sampler"])
            if ("class" in request) == ("prompt" in request):
                raise UsageError("give {classes} (class models) or {prompts} (text models), one of the two",
                                 params=["classes", "prompts"])
            check_sampling_numbers(steps=steps, sampler=sampler, cfg_scale=cfg_scale, batch_size=1,
                                   seed=seed)
            if len(jobs) + n > SAMPLING.max_batch_images:
                raise UsageError(f"the requests add up to more than {SAMPLING.max_batch_images} images",
                                 "split them into several requests files, each with its own {out}",
                                 params=["out"])
            classes = [str(request["class"])] if "class" in request else []
            prompts = [str(request["prompt"])] if "prompt" in request else []
            class_ids, prompt_rows = expand_conditions(config, classes, prompts, n)
            line_jobs = []
            for k in range(n):
                class_id = class_ids[k] if class_ids is not None else -1
                prompt = prompt_rows[k] if prompt_rows is not None else ""
                entry, _ = image_entry(config, k, class_id=None if class_id < 0 else class_id,
                                       prompt=prompt if class_id < 0 else None, prefix=f"{number:05d}_")
                if config.audio is not None:  # an audio model's clips are WAV files
                    entry["file"] = entry["file"].removesuffix(".png") + ".wav"
                line_jobs.append(BatchJob(key=f"{number}:{k}", line=number, file=f"{IMAGES}/{entry['file']}",
                                          seed=seed, index=k, steps=steps, cfg_scale=float(cfg_scale),
                                          sampler=sampler, class_id=class_id, prompt=prompt, cache=settings.cache,
                                          class_name=class_name(config, class_id) if class_id >= 0 else ""))
            check_specs(config, [job.spec() for job in line_jobs[:1]])
        except MMGenError as exc:
            said = exc.reworded(REQUEST_KEYS)
            raise UsageError(f"{where}: {said.message}", said.hint) from None
        jobs.extend(line_jobs)
    if not jobs:
        raise UsageError(f"requests file {path} holds no requests",
                         'write one JSON object per line, e.g. {"class": "red circle", "n": 3, "seed": 11}')
    return jobs


def _integer(request: dict[str, Any], key: str, default: int) -> int:
    """`request[key]` (or `default`) as an integer; errors name the key as a parameter (`REQUEST_KEYS`)."""
    value = request.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{{{key}}} must be an integer, got {value!r}", params=[key])
    if key in ("n", "steps") and value < 1:
        raise UsageError(f"{{{key}}} must be >= 1, got {value}", params=[key])
    if key == "n" and value > SAMPLING.max_images_per_line:
        raise UsageError(f"{{n}} must be at most {SAMPLING.max_images_per_line} per line, got {value}",
                         "split it over several lines with different seeds", params=["n"])
    return value


def manifest_entry(job: BatchJob, backend: str, precision: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"key": job.key, "file": job.file, "line": job.line, "index": job.index,
                             "seed": job.seed}
    if job.class_id >= 0:
        entry.update({"class": job.class_name, "class_id": job.class_id})
    else:
        entry["prompt"] = job.prompt
    entry.update({"steps": job.steps, "sampler": job.sampler, "cfg_scale": job.cfg_scale, "backend": backend,
                  "precision": precision})
    return entry


def read_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """key -> entry of every image written so far (a line cut short by a crash is ignored)."""
    done: dict[str, dict[str, Any]] = {}
    path = out / MANIFEST
    if not path.is_file():
        return done
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "key" in entry:
            done[str(entry["key"])] = entry
    return done


def pending_jobs(jobs: list[BatchJob], out: Path) -> list[BatchJob]:
    """The jobs the manifest does not hold yet; an entry made for a different request is refused."""
    done = read_manifest(out)
    todo = []
    for job in jobs:
        entry = done.get(job.key)
        if entry is None or not (out / str(entry.get("file", ""))).is_file():
            todo.append(job)
            continue
        want = manifest_entry(job, "", "")
        changed = [k for k in ("file", "seed", "class_id", "prompt", "steps", "sampler", "cfg_scale")
                   if entry.get(k) != want.get(k)]
        if changed:
            raise UsageError(f"{out / MANIFEST} has image {job.index} of request line {job.line} with another "
                             f"{', '.join(changed)} than the requests file asks for now",
                             "use a new {out} folder for changed requests (or restore the old requests file)",
                             params=["out"])
    return todo


def prepare_out(out: Path, run_root: Path, weights_sha256: str, settings: BatchSettings) -> None:
    """Create OUT (or check that it holds a batch of this same run) and record what it is made of."""
    from mmgen_deploy.io_utils import check_write_target, read_json, write_json

    info_path = out / BATCH_INFO
    check_write_target(out, folder=True, param="out")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        if not info_path.is_file():
            raise UsageError(f"{{out}} {out} exists and was not written by `mmgen batch`",
                             "choose a new {out} folder (batch resumes only its own folders)", params=["out"])
        info = read_json(info_path)
        if info.get("weights_sha256") != weights_sha256:
            raise UsageError(f"{{out}} {out} holds images of another model (run {info.get('run_dir')})",
                             "use a new {out} folder for this run", params=["out"])
        return
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    write_json(info_path, {"format": "mmgen-batch", "run_dir": str(run_root), "weights_sha256": weights_sha256,
                           "settings": asdict(settings)})


class ImageWriter:
    """Makes and writes the images of a batch of jobs: one runner per instance (one Ray actor each).

    Called with a batch as a dict of numpy columns (Ray Data's "numpy" batch format, or
    `jobs_to_columns` in-process); returns {"entry": manifest lines as JSON strings}.
    """

    def __init__(self, run_dir: str, out: str, settings: BatchSettings) -> None:
        from mmgen_deploy.rundir import RunDir
        from mmgen_deploy.runtime import open_runner

        run = RunDir(run_dir)
        self.config = run.load_config()
        self.tokenizer = run.load_tokenizer() if self.config.uses_text else None
        self.out = Path(out)
        self.settings = settings
        self.runner, choice = open_runner(run, settings.backend, settings.precision, threads=settings.threads)
        self.backend, self.precision, self.device = choice.backend, choice.precision, choice.device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mmgen_deploy.io_utils import atomic_path
        from mmgen_deploy.sampling.files import image_settings, save_png
        from mmgen_deploy.sampling.requests import sample_specs

        jobs = columns_to_jobs(batch)
        result = sample_specs(self.runner, self.config, [job.spec() for job in jobs], tokenizer=self.tokenizer,
                                 batch_size=self.settings.batch_size)
        entries = []
        for row, (job, image) in enumerate(zip(jobs, result.images, strict=True)):
            entry = manifest_entry(job, self.backend, self.precision)
            condition = (("class", job.class_name), ("class_id", job.class_id)) if job.class_id >= 0 else \
                (("prompt", job.prompt),)
            chunks = (*condition, ("index", job.index),
                      *image_settings(seed=job.seed, steps=job.steps, sampler=job.sampler, cfg_scale=job.cfg_scale,
                                      eta=SAMPLING.eta, cache=job.cache, backend=self.backend,
                                      precision=self.precision, device=self.device))
            if result.audio is not None and self.config.audio is not None:
                from mmgen_deploy.data.wav import write_wav

                write_wav(self.out / job.file, result.audio[row], self.config.audio.sample_rate,
                          settings=dict(chunks))
            else:
                with atomic_path(self.out / job.file) as tmp:
                    save_png(image, tmp, chunks)
            entries.append(json.dumps(entry))
        return {"entry": np.asarray(entries, dtype=object)}

    def close(self) -> None:
        self.runner.close()


_COLUMNS = [f.name for f in BatchJob.__dataclass_fields__.values()]  # type: ignore[attr-defined]


def jobs_to_columns(jobs: list[BatchJob]) -> dict[str, np.ndarray]:
    return {name: np.asarray([getattr(job, name) for job in jobs], dtype=object) for name in _COLUMNS}


def columns_to_jobs(batch: dict[str, np.ndarray]) -> list[BatchJob]:
    count = len(batch["key"])
    casts: dict[str, Callable[[Any], Any]] = {"line": int, "seed": int, "index": int, "steps": int,
                                              "class_id": int, "cfg_scale": float}
    return [BatchJob(**{name: casts.get(name, str)(batch[name][i]) for name in _COLUMNS}) for i in range(count)]


def _append(manifest: Any, entries: Iterable[str], report: BatchReport, started: float) -> None:
    first = report.written == 0
    for line in entries:
        manifest.write(str(line) + "\n")
        report.files.append(json.loads(line)["file"])
        report.written += 1
    manifest.flush()
    os.fsync(manifest.fileno())
    if first:
        report.first_batch_seconds = time.perf_counter() - started
        report.first_batch_images = report.written


def run_batch(run_dir: Path, requests: Path, out: Path, settings: BatchSettings, *, ray_address: str | None = None,
              workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> BatchReport:
    """Write every image of `requests` not yet in OUT's manifest; in-process, or with Ray Data."""
    from mmgen_deploy.rundir import RunDir

    run = RunDir(run_dir)
    config = run.load_config()
    settings = settings.for_run(config)
    jobs = read_requests(requests, config, settings)
    with writing_out(out):
        return _run_batch(run, jobs, out, settings, ray_address=ray_address, workers=workers, progress=progress)


@contextlib.contextmanager
def writing_out(out: Path) -> Iterator[None]:
    """Hold OUT's writer lock (created with OUT when missing): two batches into one folder would both
    make every image and list it twice in the manifest, so the second is refused in one line."""
    from mmgen_deploy.io_utils import LockBusy, check_write_target, exclusive_lock

    check_write_target(out, folder=True, param="out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    holder = {"pid": os.getpid(), "purpose": "batch",
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        with exclusive_lock(out / LOCK, holder):
            yield
    except LockBusy as busy:
        pid = busy.holder.get("pid")
        who = f" (pid {pid}, since {str(busy.holder.get('since', '?'))[11:19]})" if pid else ""
        raise OutputBusyError(f"{{out}} {out} is being written by another `mmgen batch`{who}",
                              "wait until it finishes" + (f", or stop it (kill {pid})" if pid else "")
                              + "; or write to another {out} folder", params=["out"]) from None
    finally:
        if created and [p.name for p in out.iterdir()] in ([], [LOCK]):
            with contextlib.suppress(OSError):
                (out / LOCK).unlink(missing_ok=True)
                out.rmdir()


def _run_batch(run: RunDir, jobs: list[BatchJob], out: Path, settings: BatchSettings, *, ray_address: str | None,
               workers: int | None, progress: Callable[[int, int], None] | None) -> BatchReport:
    from mmgen_deploy.io_utils import check_write_target, disk_full_as_error

    prepare_out(out, run.root.resolve(), run.weights_sha256(), settings)
    todo = pending_jobs(jobs, out)
    report = BatchReport(total=len(jobs), skipped=len(jobs) - len(todo), out=str(out), ray=ray_address)
    if not todo:
        return report  # nothing to do: no runner, no Ray
    started = time.perf_counter()
    path = out / MANIFEST
    check_write_target(path)
    with disk_full_as_error(path), open(path, "a", encoding="utf-8") as manifest:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            manifest.write("\n")  # a line cut short by a crash stays alone on its (ignored) line
        if ray_address is None:
            report.workers = 1
            for entries in _in_process(run.root, out, settings, todo):
                _append(manifest, entries, report, started)
                if progress:
                    progress(report.written, len(todo))
        else:
            for entries in _with_ray(ray_address, run.root.resolve(), out.resolve(), settings, todo, workers, report):
                _append(manifest, entries, report, started)
                if progress:
                    progress(report.written, len(todo))
    report.seconds = time.perf_counter() - started
    return report


def _in_process(run_root: Path, out: Path, settings: BatchSettings, todo: list[BatchJob]) -> Iterator[list[str]]:
    writer = ImageWriter(str(run_root), str(out), settings)
    try:
        for start in range(0, len(todo), settings.batch_size):
            yield list(writer(jobs_to_columns(todo[start:start + settings.batch_size]))["entry"])
    finally:
        writer.close()


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise NotAvailableError(f"Ray Data is not installed ({exc.name or exc})",
                                "pip install 'mmgen-deploy[batch]' (or run without {ray_address}, in-process)",
                                params=["ray_address"]) from None
    return ray


def _with_ray(address: str, run_root: Path, out: Path, settings: BatchSettings, todo: list[BatchJob],
              workers: int | None, report: BatchReport) -> Iterator[list[str]]:
    ray = _ray()
    threads = settings.threads or 1
    started_here = not ray.is_initialized()
    if started_here:
        common = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address == "local":
            # Workers import this same mmgen_deploy (a source checkout included); a small object store:
            # only manifest lines travel through it (the workers write the PNGs themselves).
            source_root = str(Path(__file__).resolve().parent.parent)
            python_path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH", "")) if p)
            ray.init(num_cpus=max(threads, os.cpu_count() or 1), object_store_memory=256 * 1024 * 1024,
                     runtime_env={"env_vars": {"PYTHONPATH": python_path}}, **common)
        else:
            package = Path(__file__).resolve().parent
            try:
                ray.init(address=address, runtime_env={"py_modules": [str(package)]}, **common)
            except Exception as exc:  # ConnectionError and friends: one line, not Ray's traceback
                raise UsageError(f"cannot connect to the Ray cluster at {address!r}: {exc}",
                                 "give {ray_address} HOST:PORT of a running cluster (`ray start --head`), or "
                                 "{ray_address} local", params=["ray_address"]) from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # `mmgen batch` shows its own progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = workers or (gpus if gpus else max(1, int(resources.get("CPU", 1) // threads)))
        report.workers = count
        per_worker = {"num_gpus": 1} if gpus else {"num_cpus": threads}
        dataset = ray.data.from_items([asdict(job) for job in todo], override_num_blocks=max(1, min(
            len(todo), count * 4)))
        results = dataset.map_batches(
            ImageWriter, fn_constructor_kwargs={"run_dir": str(run_root), "out": str(out), "settings": settings},
            batch_size=max(1, min(settings.batch_size, -(-len(todo) // count))), batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=count), **per_worker)
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            yield list(batch["entry"])
    finally:
        if started_here:
            ray.shutdown()
