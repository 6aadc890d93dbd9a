"""Write a Triton model repository for a run directory (`mmgen triton-repo`).

    REPO/
      README.md                         how to serve it (official container, replicas)
      mmgen_generate/
        config.pbtxt                    Python backend, dynamic batching, instance groups
        1/model.py                      the sampling loop (mmgen_deploy/serve/triton_model.py)
        1/run/                          the run's config, weights, ONNX and engines (copy mode)
        1/mmgen_deploy/                 the exact mmgen_deploy source this repo was written with

With `layout="ensemble"` the three components the sampling loop calls (denoiser, quantizer,
decoder) also become Triton models `mmgen_<component>` (ONNX for Triton's onnxruntime backend,
or a Python-backend ONNX Runtime wrapper where that backend is missing), and `mmgen_generate`
drives them as a BLS model: the same `sample()` loop, with every component call going through
Triton, so Triton schedules (and can batch across instances) the component executions itself.

The repository is written into a temporary directory and renamed over REPO only when
complete, so a failure never leaves a half-written repository (or damages an old one).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import UsageError
from mmgen_deploy.io_utils import atomic_dir, write_json
from mmgen_deploy.rundir import DEPLOY_ENTRIES, TEXT_PART, RunDir
from mmgen_deploy.sampling.cache import parse_cache_policy
from mmgen_deploy.sampling.schedulers import SAMPLERS
from mmgen_deploy.serve import MODEL_NAME
from mmgen_deploy.specs import DENOISER_PARTS, PARTS_WORD, has_denoiser_parts, sampling_components

if TYPE_CHECKING:
    from mmgen_deploy.config import ModelConfig
    from mmgen_deploy.specs import ComponentSpec, TensorSpec

# What of a run directory the server needs: configs, inference weights, exported models.
# (The text encoder part of a text run too: its weights, config and tokenizer; absent entries are skipped.)
RUN_ARTIFACTS = tuple(dict.fromkeys((*DEPLOY_ENTRIES, TEXT_PART)))
INSTANCE_KINDS = ("cpu", "gpu")
ARTIFACT_MODES = ("copy", "reference")
LAYOUTS = ("python", "ensemble")
COMPONENT_BACKENDS = ("onnxruntime", "python")
COMPONENT_PREFIX = "mmgen_"
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64"}


@dataclass(frozen=True)
class RepositoryOptions:
    max_batch_size: int = SAMPLING.batch_size
    instances: int = 1
    instance_kind: str = "cpu"
    max_queue_delay_us: int = 20_000
    backend: str = "auto"
    precision: str = "auto"
    threads: int = 0
    sampler: str = SAMPLING.sampler  # the default sampler
    samplers: tuple[str, ...] = SAMPLERS  # what requests may ask for
    default_steps: int = SAMPLING.steps
    default_cfg_scale: float = SAMPLING.cfg_scale
    max_steps: int = SAMPLING.max_steps
    max_cfg_scale: float = SAMPLING.max_cfg_scale
    # The step-caching policy of requests that send none. Requests may ask for any policy whenever the
    # run has the denoiser's parts (they travel with the run); a default other than none needs them.
    cache: str = SAMPLING.cache
    artifacts: str = "copy"
    layout: str = "python"
    component_backend: str = "onnxruntime"
    vendor_source: bool = True

    def validate(self) -> None:
        """Refuse bad options; messages name them by field (see `MMGenError.describe`)."""
        checks = [
            (1 <= self.max_batch_size <= SAMPLING.max_batch_size,
             f"{{max_batch_size}} must be in 1..{SAMPLING.max_batch_size}, got {self.max_batch_size}"),
            (self.instances >= 1, f"{{instances}} must be >= 1, got {self.instances}"),
            (self.instance_kind in INSTANCE_KINDS,
             f"{{instance_kind}} must be one of {', '.join(INSTANCE_KINDS)}, got {self.instance_kind!r}"),
            (self.max_queue_delay_us >= 0, "{max_queue_delay_us} must be >= 0"),
            (self.threads >= 0, f"{{threads}} must be >= 0 (0 = the backend's default), got {self.threads}"),
            (self.artifacts in ARTIFACT_MODES,
             f"{{artifacts}} must be one of {', '.join(ARTIFACT_MODES)}, got {self.artifacts!r}"),
            (1 <= self.default_steps <= self.max_steps,
             f"{{default_steps}} {self.default_steps} must be in 1..{self.max_steps} ({{max_steps}})"),
            (0 <= self.max_cfg_scale <= SAMPLING.max_cfg_scale,
             f"{{max_cfg_scale}} must be in 0..{SAMPLING.max_cfg_scale:g}"),
            (0 <= self.default_cfg_scale <= self.max_cfg_scale,
             f"{{default_cfg_scale}} {self.default_cfg_scale} must be in 0..{self.max_cfg_scale}"),
        ]
        fields = [f.name for f in dataclasses.fields(self)]
        for ok, message in checks:
            if not ok:
                raise UsageError(message, "see `mmgen triton-repo --help`", params=fields)
        unknown = [s for s in (self.sampler, *self.samplers) if s not in SAMPLERS]
        if unknown or not self.samplers:
            raise UsageError(f"unknown sampler {unknown[0]!r}" if unknown else "{samplers} is empty",
                             f"choose from {', '.join(SAMPLERS)}", params=fields)
        if self.sampler not in self.samplers:
            raise UsageError(f"{{sampler}} {self.sampler} is not in {{samplers}} {','.join(self.samplers)}",
                             "allow the default sampler too", params=fields)
        if self.layout not in LAYOUTS:
            raise UsageError(f"{{layout}} must be one of {', '.join(LAYOUTS)}, got {self.layout!r}", params=fields)
        if self.component_backend not in COMPONENT_BACKENDS:
            raise UsageError(f"{{component_backend}} must be one of {', '.join(COMPONENT_BACKENDS)}, "
                             f"got {self.component_backend!r}", params=fields)
        parse_cache_policy(self.cache)


def _pbtxt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config_pbtxt(image_shape: tuple[int, int, int], options: RepositoryOptions, run_dir: str,
                       metadata: dict[str, str] | None = None, *, audio_samples: int | None = None) -> str:
    """config.pbtxt of `mmgen_generate` (protobuf text format, read by Triton).

    `metadata` (the run's config and tokenizer as JSON) becomes parameters too: `mmgen client`
    reads them from the server to resolve class names, warn about prompts and label its PNGs.
    `audio_samples` (an audio run's clip length) adds the AUDIO output: each row's float32 waveform.
    """
    height, width, channels = image_shape
    kind = "KIND_GPU" if options.instance_kind == "gpu" else "KIND_CPU"
    parameters = {
        "run_dir": run_dir,
        "backend": options.backend,
        "precision": options.precision,
        "threads": str(options.threads),
        "default_sampler": options.sampler,
        "samplers": ",".join(options.samplers),
        "default_steps": str(options.default_steps),
        "default_cfg_scale": repr(float(options.default_cfg_scale)),
        "max_steps": str(options.max_steps),
        "max_cfg_scale": repr(float(options.max_cfg_scale)),
        "default_cache": parse_cache_policy(options.cache).spec,
        "runner": "bls" if options.layout == "ensemble" else "local",
        "component_prefix": COMPONENT_PREFIX,
        **(metadata or {}),
    }
    audio_output = ("" if audio_samples is None else
                    f',\n  {{ name: "AUDIO" data_type: TYPE_FP32 dims: [ {audio_samples} ] }}')
    params = "\n".join(f"parameters: {{ key: {_pbtxt_string(k)} value: {{ string_value: {_pbtxt_string(v)} }} }}"
                       for k, v in parameters.items())
    return f"""# Written by `mmgen triton-repo`. One request row = one image; see 1/model.py for the semantics.
name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {options.max_batch_size}
input [
  {{ name: "CLASS" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "CLASS_ID" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "SEED" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "INDEX" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "STEPS" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "CFG_SCALE" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "SAMPLER" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "CACHE" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "IMAGE" data_type: TYPE_UINT8 dims: [ {height}, {width}, {channels} ] }}{audio_output}
]
# Requests that arrive within the delay are merged into one execute() call (one sampling batch).
dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}
instance_group [ {{ kind: {kind} count: {options.instances} }} ]
{params}
"""


def component_config_pbtxt(spec: ComponentSpec, max_batch_size: int, options: RepositoryOptions) -> str:
    """config.pbtxt of one component model (batch axis first and implicit, as Triton wants it)."""
    def tensor(t: TensorSpec) -> str:
        dims = [int(d) for d in t.shape[1:]]
        # A per-sample scalar (shape [batch]) is declared [1] and reshaped to [] for the model.
        shape = f"dims: [ {', '.join(map(str, dims))} ]" if dims else "dims: [ 1 ] reshape: { shape: [ ] }"
        return f'  {{ name: "{t.name}" data_type: {_TRITON_DTYPES[t.dtype]} {shape} }}'

    if options.component_backend == "python":
        engine = 'backend: "python"'
    else:
        engine = 'platform: "onnxruntime_onnx"'
    kind = "KIND_GPU" if options.instance_kind == "gpu" else "KIND_CPU"
    inputs = ",\n".join(tensor(t) for t in spec.inputs)
    outputs = ",\n".join(tensor(t) for t in spec.outputs)
    return f"""# Written by `mmgen triton-repo --layout ensemble`: called by mmgen_generate's sampling loop.
name: "{COMPONENT_PREFIX}{spec.name}"
{engine}
max_batch_size: {max_batch_size}
input [
{inputs}
]
output [
{outputs}
]
dynamic_batching {{ }}
instance_group [ {{ kind: {kind} count: 1 }} ]
parameters: {{ key: "threads" value: {{ string_value: "{options.threads}" }} }}
"""


def _ensemble_precision(run_root: Path, options: RepositoryOptions, components: tuple[str, ...]) -> str:
    from mmgen_deploy.export import onnx_path

    def complete(precision: str) -> bool:
        return all(onnx_path(run_root, precision, c).is_file() for c in components)

    if options.precision != "auto":
        if not complete(options.precision):
            raise UsageError(f"{{layout}} ensemble needs the {options.precision} ONNX set of "
                             f"{', '.join(components)} in {RunDir(run_root).onnx_dir}",
                             f"run `mmgen export {run_root}` first", params=["layout"])
        return options.precision
    # fp16 graphs are for GPUs; the CPU-only Python wrapper runs the fp32 set.
    order = ("fp32", "fp16") if options.component_backend == "python" else ("fp16", "fp32")
    for precision in order:
        if complete(precision):
            return precision
    raise UsageError(f"{{layout}} ensemble needs an exported ONNX set in {RunDir(run_root).onnx_dir}",
                     f"run `mmgen export {run_root}` first", params=["layout"])


def _write_components(run_root: Path, repo: Path, config: ModelConfig, options: RepositoryOptions) -> dict[str, str]:
    from mmgen_deploy.export import onnx_path, read_manifest
    from mmgen_deploy.onnx_files import copy_onnx
    from mmgen_deploy.ort_graphs import ort_cpu_model
    from mmgen_deploy.specs import component_specs

    components = sampling_components(config)  # they follow the first stage (a KL one has no quantizer)
    precision = _ensemble_precision(run_root, options, components)
    specs = component_specs(config, parts=True)
    run = RunDir(run_root)
    # The denoiser's parts become component models too where they were exported: step caching is served.
    if has_denoiser_parts(config.dit) and all(onnx_path(run_root, precision, p).is_file() for p in DENOISER_PARTS):
        components = (*components, *DENOISER_PARTS)
    elif parse_cache_policy(options.cache).enabled:
        raise UsageError(f"{{cache}} {parse_cache_policy(options.cache).spec} needs the denoiser's parts in the "
                         f"{precision} ONNX set the ensemble serves", f"export them: `mmgen export {run_root} "
                         f"--components {PARTS_WORD} --precision {precision}`", params=["cache"])
    export_manifest = read_manifest(run) if run.onnx_manifest_path.is_file() else {}
    written = {}
    for name in components:
        spec = specs[name]
        version_dir = repo / f"{COMPONENT_PREFIX}{name}" / "1"
        version_dir.mkdir(parents=True)
        run.check_onnx_current(export_manifest, precision, spec)  # ship only the graphs the export wrote
        source = onnx_path(run_root, precision, name)
        on_ort_cpu = options.component_backend == "python" or options.instance_kind == "cpu"
        model = ort_cpu_model(source, has_group_norms=spec.has_group_norms, cache_dir=None) if on_ort_cpu \
            else str(source)
        if isinstance(model, bytes):  # ONNX Runtime's CPU kernels get the precise GroupNorms (ort_graphs)
            (version_dir / "model.onnx").write_bytes(model)
        else:  # weights stored beside the graph (graphs over 2 GB) keep the file name the graph records
            copy_onnx(source, version_dir / "model.onnx")
        if options.component_backend == "python":
            shutil.copy2(Path(__file__).with_name("triton_component.py"), version_dir / "model.py")
        max_batch = options.max_batch_size * spec.batch_multiplier  # guidance doubles the denoiser batch
        (version_dir.parent / "config.pbtxt").write_text(component_config_pbtxt(spec, max_batch, options))
        written[name] = RunDir.onnx_relpath(precision, name)
    return written


def _check_cache_default(run: RunDir, config: ModelConfig, options: RepositoryOptions) -> None:
    """A default cache policy other than none needs the denoiser's parts: refuse a run that cannot have
    them or has exported none (the torch backend builds them from the weights). Which set a server's
    backend reads is decided when it loads; a request it cannot serve gets a one-line error then."""
    from mmgen_deploy.specs import PRECISIONS

    policy = parse_cache_policy(options.cache)
    if not policy.enabled:
        return
    if not has_denoiser_parts(config.dit):
        raise UsageError(f"{{cache}} {policy.spec}: this model's DiT has {config.dit.depth} block(s), too few to "
                         "split into the parts step caching reuses", "serve it without a default cache policy",
                         params=["cache"])
    if options.backend == "torch" and options.layout == "python":
        return
    if not any(all(run.onnx_path(p, part).is_file() for part in DENOISER_PARTS) for p in PRECISIONS):
        raise UsageError(f"{{cache}} {policy.spec} needs the denoiser's parts, and {run.onnx_dir} has none",
                         f"export them: `mmgen export {run.root} --components {PARTS_WORD}`", params=["cache"])


def _copy_run(run_root: Path, dest: Path, names: tuple[str, ...] = RUN_ARTIFACTS) -> list[str]:
    copied = []
    for name in names:
        source = run_root / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns(".*"))
            copied.append(name + "/")
        elif source.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
            copied.append(name)
    return copied


def write_repository(run_dir: Path, out: Path, options: RepositoryOptions | None = None) -> dict[str, Any]:
    """Write the repository for `run_dir` to `out` (atomically). Returns a summary dict."""
    options = options or RepositoryOptions()
    options.validate()
    run = RunDir(run_dir)
    config = run.load_config()  # refuses a missing or foreign run directory with a clear message
    for part in run.model_parts(config):
        if not run.has_part(part):
            from mmgen_deploy.models.load import load_deployable

            load_deployable(run)  # raises the precise missing/corrupt-weights error
    if config.uses_text:
        run.load_tokenizer()  # a text run without its tokenizer cannot encode prompts
    _check_cache_default(run, config, options)
    run_root = run.root.resolve()
    if out.resolve() == run_root or run_root in out.resolve().parents:
        raise UsageError(f"{{out}} {out} is inside the run directory", "write the repository somewhere else",
                         params=["out"])

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "mmgen_repository.json").is_file())):
        raise UsageError(f"{{out}} {out} exists and is not an mmgen Triton repository",
                         "pick a new or empty directory (an old mmgen repository is replaced)", params=["out"])
    size = config.first_stage.image_size
    image_shape = (size, size, config.first_stage.in_channels)
    with atomic_dir(out) as tmp:
        version_dir = tmp / MODEL_NAME / "1"
        version_dir.mkdir(parents=True)
        components: dict[str, str] = {}
        if options.layout == "ensemble":
            components = _write_components(run_root, tmp, config, options)
        if options.artifacts == "copy":
            # The BLS loop needs only the configs: the weights live in the component models.
            names = ("run.json", *run.model_parts(config)) if options.layout == "ensemble" else RUN_ARTIFACTS
            artifacts = _copy_run(run_root, version_dir / "run", names)
            if options.layout == "ensemble":  # configs and the tokenizer stay
                for part in run.model_parts(config):
                    (version_dir / "run" / part / "model.safetensors").unlink(missing_ok=True)
            run_ref = "run"
        else:
            artifacts = []
            run_ref = str(run_root)
        metadata = {"conditioning": "text" if config.uses_text else "class",
                    "run_config": json.dumps(config.to_dict(), separators=(",", ":"))}
        if config.uses_text:
            metadata["tokenizer"] = json.dumps(run.load_tokenizer().to_dict(), separators=(",", ":"))
        audio_samples = config.audio.clip_samples if config.audio is not None else None
        (tmp / MODEL_NAME / "config.pbtxt").write_text(model_config_pbtxt(image_shape, options, run_ref, metadata,
                                                                          audio_samples=audio_samples))
        shutil.copy2(Path(__file__).with_name("triton_model.py"), version_dir / "model.py")
        if options.vendor_source:
            # The stub appends the version directory to sys.path: an installed mmgen_deploy wins,
            # this copy is the fallback inside a container that has only the dependencies.
            package = Path(__file__).resolve().parent.parent
            shutil.copytree(package, version_dir / "mmgen_deploy",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        summary: dict[str, Any] = {
            "repository": str(out),
            "model": MODEL_NAME,
            "run_dir": str(run_root),
            "artifacts": options.artifacts,
            "copied": artifacts,
            "layout": options.layout,
            "components": components,
            "image_shape": list(image_shape),
            "audio": None if config.audio is None else {"samples": config.audio.clip_samples,
                                                        "sample_rate": config.audio.sample_rate},
            "conditioning": metadata["conditioning"],
            "num_classes": config.dit.num_classes,
            "class_names": list(config.class_names),
            "options": asdict(options),
        }
        (tmp / "README.md").write_text(repository_readme(summary))
        write_json(tmp / "mmgen_repository.json", summary)
    return summary


def _layout_note(summary: dict[str, Any]) -> str:
    if summary["layout"] != "ensemble":
        return ""
    parts = ", ".join(f"`{COMPONENT_PREFIX}{name}` ({path})" for name, path in summary["components"].items())
    return (f"Ensemble layout: {parts} are Triton models of their own, and `{MODEL_NAME}` runs the sampling "
            "loop as a BLS model whose every component call is a Triton inference request.\n")


def _condition_rows(summary: dict[str, Any]) -> str:
    if summary.get("conditioning") == "text":
        return "| PROMPT | BYTES [1] | a text prompt (this is a text-to-image model; CLASS is refused) |\n"
    names = ", ".join(summary["class_names"]) or "(this model has no class names)"
    return (f"| CLASS | BYTES [1] | a class name ({names}) or id 0..{summary['num_classes'] - 1} |\n"
            f"| CLASS_ID | INT32 [1] | a class id 0..{summary['num_classes'] - 1} (instead of CLASS) |\n")


def _output_rows(summary: dict[str, Any]) -> str:
    audio = summary.get("audio")
    if audio is None:
        return f"| IMAGE (output) | UINT8 {summary['image_shape']} | the image |\n"
    return (f"| IMAGE (output) | UINT8 {summary['image_shape']} | the clip's spectrogram (high frequencies at the "
            "top) |\n"
            f"| AUDIO (output) | FP32 [{audio['samples']}] | the vocoder's waveform, {audio['sample_rate']} Hz mono, "
            "1.0 = full scale (`mmgen client` writes it as generate's 16-bit WAV) |\n")


def _client_command(summary: dict[str, Any]) -> str:
    """An `mmgen client` command line for the served model, in backticks."""
    if summary.get("conditioning") == "text":
        return '`mmgen client http://HOST:8000 --prompt "a large blue triangle at the top" --n 4`'
    name = f'"{summary["class_names"][0]}"' if summary["class_names"] else "3"
    return f"`mmgen client http://HOST:8000 --class {name} --n 4`"


def repository_readme(summary: dict[str, Any]) -> str:
    from mmgen_deploy.runtime.backends import describe_auto_order

    opts = summary["options"]
    return f"""# Triton model repository for an mmgen run

Written by `mmgen triton-repo` from `{summary["run_dir"]}` (artifacts: {summary["artifacts"]}).
One model, `{MODEL_NAME}` (Python backend): each request row is one image.

| input | type | meaning |
|---|---|---|
{_condition_rows(summary)}| SEED | INT64 [1] | >= 0 (default 0) |
| INDEX | INT64 [1] | >= 0 (default 0): noise from default_rng([SEED, INDEX]): image INDEX of `generate --seed SEED` |
| STEPS | INT32 [1] | 1..{opts["max_steps"]} (default {opts["default_steps"]}) |
| CFG_SCALE | FP32 [1] | 0..{opts["max_cfg_scale"]:g} (default {opts["default_cfg_scale"]:g}) |
| SAMPLER | BYTES [1] | {", ".join(opts["samplers"])} (default {opts["sampler"]}) |
| CACHE | BYTES [1] | step caching: none, every:N or adaptive:T (default {opts["cache"]}; see docs/caching.md) |
{_output_rows(summary)}
Dynamic batching merges requests arriving within {opts["max_queue_delay_us"]} us into one sampling
batch (max {opts["max_batch_size"]} images); {opts["instances"]} instance(s) of kind
{opts["instance_kind"]}; backend `{opts["backend"]}` (auto = {describe_auto_order()}), precision
{opts["precision"]}.

{_layout_note(summary)}
## Serve on a GPU host with the official Triton container

The Python backend runs `1/model.py` with the container's Python, so install mmgen's
runtime dependencies in it first (`1/mmgen_deploy/` holds the exact mmgen source used to
write this repository; an installed mmgen-deploy takes precedence). TensorRT engines only
load on the TensorRT version and GPU architecture that built them: use a container whose
TensorRT matches `engines/` or rebuild the engines inside it.

```bash
docker run --rm --gpus all --shm-size 1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
  -v "$PWD":/models nvcr.io/nvidia/tritonserver:24.10-py3 \\
  bash -c "pip install torch numpy onnxruntime-gpu safetensors Pillow && \\
           tritonserver --model-repository=/models"
```

Then `curl localhost:8000/v2/health/ready` and {_client_command(summary)}.
Without the container: `mmgen serve {summary["repository"]}` (tritonserver from the nvidia-pytriton wheel).

## Scale out

Run one container per GPU (or per host) and put an HTTP/gRPC load balancer in front; each
replica is stateless, readiness is `/v2/health/ready`, metrics are on port 8002.
"""
