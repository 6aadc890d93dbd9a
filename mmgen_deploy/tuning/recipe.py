"""The recipe: the configuration `tune` chose, with the evidence and what it is valid for.

RUN_DIR/recipe.json holds the chosen configuration, the measured front, the machine it was measured on
(`machine_fingerprint`) and the hashes of the artifacts it measured (the weights, and the exported graphs
the chosen backend reads, as the export manifest records them). `load_recipe` refuses, in one line, a
recipe from another machine or for artifacts that changed since: its timings and qualities would not
hold.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgen_deploy.errors import RunDirError
from mmgen_deploy.rundir import RunDir, RunLike
from mmgen_deploy.tuning.search import Measurement, TuneResult
from mmgen_deploy.tuning.space import Candidate

RECIPE_FORMAT = "mmgen-recipe"
RECIPE_FORMAT_VERSION = 1


def machine_fingerprint() -> dict[str, Any]:
    """What a measurement's timings depend on beyond the software: the CPU model, the instruction sets
    that decide its peak (`cpuinfo.FLAGS`), the logical CPUs, the architecture; and a hash of them."""
    from mmgen_deploy.cpuinfo import cpu_features

    features = cpu_features()
    machine = {"cpu": features.model, "flags": features.present(), "cpus": os.cpu_count(),
               "architecture": platform.machine()}
    machine["fingerprint"] = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()
    return machine


def artifact_hashes(run: RunDir, candidate: Candidate) -> dict[str, Any]:
    """The hashes of what `candidate` reads from `run`: the weights (`RunDir.weights_sha256`) and, for a
    backend that reads exported graphs, each graph's sha256 as the export manifest records it."""
    from mmgen_deploy.io_utils import read_json
    from mmgen_deploy.runtime.backends import backend_spec
    from mmgen_deploy.sampling.cache import parse_cache_policy
    from mmgen_deploy.specs import DENOISER_PARTS, sampling_components

    hashes: dict[str, Any] = {"weights_sha256": run.weights_sha256()}
    onnx_set = backend_spec(candidate.engine.backend).onnx_set(candidate.engine.precision)
    if onnx_set is None:
        return hashes
    components = list(sampling_components(run.load_config()))
    if parse_cache_policy(candidate.settings.cache).enabled:
        components += DENOISER_PARTS
    try:
        files = read_json(run.onnx_manifest_path).get("files", {}).get(onnx_set, {})
    except (OSError, ValueError, AttributeError):
        files = {}
    hashes["onnx_set"] = onnx_set
    hashes["onnx"] = {c: (files.get(c) or {}).get("sha256") for c in components}
    return hashes


def build_recipe(result: TuneResult, run: RunLike, max_quality_drop: float) -> dict[str, Any]:
    """The recipe for `result` with `max_quality_drop` points allowed below the reference."""
    run = RunDir.of(run)
    chosen = result.choose(max_quality_drop)
    model_run = result.student if chosen.candidate.model == "student" and result.student is not None else run
    default = result.default
    return {
        "format": RECIPE_FORMAT, "format_version": RECIPE_FORMAT_VERSION,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_dir": str(run.root.resolve()),
        "model_dir": str(model_run.root.resolve()),  # read back for a student only
        "measure": result.measure.describe(),
        "max_quality_drop": max_quality_drop,
        "chosen": {**chosen.to_dict(), "threads": result.options.threads,
                   "drop": _rounded(result.drop(chosen)[0]), "drop_stderr": _rounded(result.drop(chosen)[1])},
        "speedup_over_default": _ratio(default, chosen),
        "reference": result.reference.to_dict(),
        "default": default.to_dict(),
        "front": [m.to_dict() for m in result.front()],
        "machine": machine_fingerprint(),
        "artifacts": artifact_hashes(model_run, chosen.candidate),
        "search": search_summary(result),
    }


def _rounded(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def _ratio(slow: Measurement, fast: Measurement) -> float | None:
    if not slow.scores or not fast.scores or fast.ms_per_image <= 0:
        return None
    return round(slow.ms_per_image / fast.ms_per_image, 3)


def search_summary(result: TuneResult) -> dict[str, Any]:
    return {"seconds": round(result.seconds, 1), "budget_seconds": result.options.budget_seconds,
            "budget_exhausted": result.budget_exhausted, "rungs": result.rungs, "seed": result.options.seed,
            "threads": result.options.threads, "counts": result.pruned_counts(),
            "configurations": len(result.measurements)}


def write_recipe(run: RunLike, recipe: dict[str, Any]) -> Path:
    """Write RUN_DIR/recipe.json atomically (an interrupted write leaves the previous file, or none)."""
    from mmgen_deploy.io_utils import write_json

    path = RunDir.of(run).recipe_path
    write_json(path, recipe)
    return path


@dataclass(frozen=True)
class Recipe:
    """A recipe checked against this machine and the run's current artifacts."""

    path: Path
    candidate: Candidate
    model_dir: Path  # the run that samples: the tuned run, or its distilled student
    threads: int | None
    data: dict[str, Any]


def load_recipe(run: RunLike) -> Recipe:
    """RUN_DIR/recipe.json, refused in one line when it is missing or damaged, was measured on another
    machine, or measured artifacts that have changed since."""
    from mmgen_deploy.io_utils import read_json

    run = RunDir.of(run)
    path = run.recipe_path
    retune = f"re-run `mmgen tune {run.root}` with a maximum quality drop"
    if not path.is_file():
        raise RunDirError(f"{run.root} has no recipe ({path.name})", retune)
    try:
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
            raise ValueError("not an mmgen recipe")
        if int(data.get("format_version", 0)) > RECIPE_FORMAT_VERSION:
            raise ValueError("written by a newer mmgen-deploy")
        candidate = Candidate.from_dict(data["chosen"]["config"])
        threads = data["chosen"].get("threads")
        model_dir = Path(data["model_dir"])
        machine = data["machine"]["fingerprint"]
        artifacts = data["artifacts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{path} is not a readable recipe ({exc})", retune) from None
    here = machine_fingerprint()
    if machine != here["fingerprint"]:
        measured_on = data["machine"].get("cpu", "another CPU")
        raise RunDirError(f"{path} was measured on another machine ({measured_on}, {data['machine'].get('cpus')} "
                          f"CPUs), not this one ({here['cpu']}, {here['cpus']} CPUs)", retune)
    # The tuned run is the one given (a recipe travels with its run); a student is named by its path.
    model_run = RunDir(model_dir) if candidate.model == "student" else run
    if candidate.model == "student" and not model_run.exists():
        raise RunDirError(f"{path} chose the student {model_dir}, which no longer exists", retune)
    try:
        current = artifact_hashes(model_run, candidate)
    except RunDirError as exc:
        raise RunDirError(f"{path} measured artifacts that are gone ({exc.message})", retune) from None
    if current != artifacts:
        changed = [key for key in sorted(set(current) | set(artifacts)) if current.get(key) != artifacts.get(key)]
        raise RunDirError(f"{path} is stale: {', '.join(changed)} of {model_dir} changed since it was measured",
                          retune)
    return Recipe(path, candidate, model_run.root, None if threads is None else int(threads), data)
