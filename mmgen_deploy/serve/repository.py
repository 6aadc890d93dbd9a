"""Write a Triton model repository for a run directory (`mmgen triton-repo`).

    REPO/
      README.md                         how to serve it (official container, replicas)
      mmgen_generate/
        config.pbtxt                    Python backend, dynamic batching, instance groups
        1/model.py                      the sampling loop (mmgen_deploy/serve/triton_model.py)
        1/run/                          the run's config, weights, ONNX and engines (copy mode)
        1/mmgen_deploy/                 the exact mmgen_deploy source this repo was written with

The repository is written into a temporary directory and renamed over REPO only when
complete, so a failure never leaves a half-written repository (or damages an old one).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmgen_deploy.errors import UsageError
from mmgen_deploy.io_utils import atomic_dir, write_json
from mmgen_deploy.serve import MODEL_NAME

# What of a run directory the server needs: configs, inference weights, exported models.
RUN_ARTIFACTS = ("run.json", "vqvae", "dit", "onnx", "engines")
INSTANCE_KINDS = ("cpu", "gpu")
ARTIFACT_MODES = ("copy", "reference")
LAYOUTS = ("python", "ensemble")


@dataclass(frozen=True)
class RepositoryOptions:
    max_batch_size: int = 16
    instances: int = 1
    instance_kind: str = "cpu"
    max_queue_delay_us: int = 20_000
    backend: str = "auto"
    precision: str = "auto"
    threads: int = 0
    sampler: str = "ddim"
    default_steps: int = 50
    default_guidance: float = 4.0
    max_steps: int = 250
    max_guidance: float = 50.0
    artifacts: str = "copy"
    layout: str = "python"
    vendor_source: bool = True

    def validate(self) -> None:
        checks = [
            (self.max_batch_size >= 1, f"--max-batch must be >= 1, got {self.max_batch_size}"),
            (self.instances >= 1, f"--instances must be >= 1, got {self.instances}"),
            (self.instance_kind in INSTANCE_KINDS,
             f"--instance-kind must be one of {', '.join(INSTANCE_KINDS)}, got {self.instance_kind!r}"),
            (self.max_queue_delay_us >= 0, "--max-queue-delay-us must be >= 0"),
            (self.threads >= 0, f"--threads must be >= 0 (0 = the backend's default), got {self.threads}"),
            (self.artifacts in ARTIFACT_MODES,
             f"--artifacts must be one of {', '.join(ARTIFACT_MODES)}, got {self.artifacts!r}"),
            (1 <= self.default_steps <= self.max_steps,
             f"--steps {self.default_steps} must be in 1..{self.max_steps} (--max-steps)"),
            (0 <= self.default_guidance <= self.max_guidance,
             f"--guidance {self.default_guidance} must be in 0..{self.max_guidance}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message, "see `mmgen triton-repo --help`")
        if self.layout not in LAYOUTS:
            raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "ensemble":
            raise UsageError("--layout ensemble (per-component Triton models driven by a BLS loop) is not "
                             "implemented yet", "use the default --layout python")


def _pbtxt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config_pbtxt(image_shape: tuple[int, int, int], options: RepositoryOptions, run_dir: str) -> str:
    """config.pbtxt of `mmgen_generate` (protobuf text format, read by Triton)."""
    height, width, channels = image_shape
    kind = "KIND_GPU" if options.instance_kind == "gpu" else "KIND_CPU"
    parameters = {
        "run_dir": run_dir,
        "backend": options.backend,
        "precision": options.precision,
        "threads": str(options.threads),
        "sampler": options.sampler,
        "default_steps": str(options.default_steps),
        "default_guidance": repr(float(options.default_guidance)),
        "max_steps": str(options.max_steps),
        "max_guidance": repr(float(options.max_guidance)),
    }
    params = "\n".join(f"parameters: {{ key: {_pbtxt_string(k)} value: {{ string_value: {_pbtxt_string(v)} }} }}"
                       for k, v in parameters.items())
    return f"""# Written by `mmgen triton-repo`. One request row = one image; see 1/model.py for the semantics.
name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {options.max_batch_size}
input [
  {{ name: "CLASS_ID" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "SEED" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "STEPS" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "GUIDANCE" data_type: TYPE_FP32 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "IMAGE" data_type: TYPE_UINT8 dims: [ {height}, {width}, {channels} ] }}
]
# Requests that arrive within the delay are merged into one execute() call (one sampling batch).
dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}
instance_group [ {{ kind: {kind} count: {options.instances} }} ]
{params}
"""


def _copy_run(run_root: Path, dest: Path) -> list[str]:
    copied = []
    for name in RUN_ARTIFACTS:
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
    from mmgen_deploy.rundir import RunDir

    options = options or RepositoryOptions()
    options.validate()
    run = RunDir(run_dir)
    config = run.load_config()  # refuses a missing or foreign run directory with a clear message
    for part in ("vqvae", "dit"):
        if not run.has_part(part):
            run.load_models()  # raises the precise missing/corrupt-weights error
    run_root = run.root.resolve()
    if out.resolve() == run_root or run_root in out.resolve().parents:
        raise UsageError(f"--out {out} is inside the run directory", "write the repository somewhere else")

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "mmgen_repository.json").is_file())):
        raise UsageError(f"--out {out} exists and is not an mmgen Triton repository",
                         "pick a new or empty directory (an old mmgen repository is replaced)")
    size = config.vq.image_size
    image_shape = (size, size, config.vq.in_channels)
    with atomic_dir(out) as tmp:
        version_dir = tmp / MODEL_NAME / "1"
        version_dir.mkdir(parents=True)
        if options.artifacts == "copy":
            artifacts = _copy_run(run_root, version_dir / "run")
            run_ref = "run"
        else:
            artifacts = []
            run_ref = str(run_root)
        (tmp / MODEL_NAME / "config.pbtxt").write_text(model_config_pbtxt(image_shape, options, run_ref))
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
            "image_shape": list(image_shape),
            "num_classes": config.dit.num_classes,
            "class_names": list(config.class_names),
            "options": asdict(options),
        }
        (tmp / "README.md").write_text(repository_readme(summary))
        write_json(tmp / "mmgen_repository.json", summary)
    return summary


def repository_readme(summary: dict[str, Any]) -> str:
    opts = summary["options"]
    return f"""# Triton model repository for an mmgen run

Written by `mmgen triton-repo` from `{summary["run_dir"]}` (artifacts: {summary["artifacts"]}).
One model, `{MODEL_NAME}` (Python backend): each request row is one image.

| input | type | meaning |
|---|---|---|
| CLASS_ID | INT32 [1] | class index 0..{summary["num_classes"] - 1} (or send PROMPT) |
| PROMPT | BYTES [1] | class name: {", ".join(summary["class_names"]) or "(this model has no class names)"} |
| SEED | INT64 [1] | >= 0; same image as `mmgen generate --seed SEED --n 1` (default 0) |
| STEPS | INT32 [1] | 1..{opts["max_steps"]} (default {opts["default_steps"]}) |
| GUIDANCE | FP32 [1] | 0..{opts["max_guidance"]:g} (default {opts["default_guidance"]:g}) |
| IMAGE (output) | UINT8 {summary["image_shape"]} | RGB |

Dynamic batching merges requests arriving within {opts["max_queue_delay_us"]} us into one sampling
batch (max {opts["max_batch_size"]} images); {opts["instances"]} instance(s) of kind
{opts["instance_kind"]}; backend `{opts["backend"]}` (auto = TensorRT engines, else ONNX Runtime CUDA,
else ONNX Runtime CPU), precision {opts["precision"]}.

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

Then `curl localhost:8000/v2/health/ready` and `mmgen client http://HOST:8000 --class 3 --n 4`.
Without the container: `mmgen serve {summary["repository"]}` (tritonserver from the nvidia-pytriton wheel).

## Scale out

Run one container per GPU (or per host) and put an HTTP/gRPC load balancer in front; each
replica is stateless, readiness is `/v2/health/ready`, metrics are on port 8002.
"""
