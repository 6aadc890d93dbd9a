"""Shared by the engine tests: a tiny run directory with its FP16 ONNX set."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from mmgen_deploy.config import preset
from mmgen_deploy.models import DiT, VQModel, build_components, rerandomize_
from mmgen_deploy.models.load import load_dit, load_vqvae
from mmgen_deploy.rundir import RunDir, save_run
from mmgen_deploy.specs import component_specs


def export_onnx_set(run: RunDir, precision: str = "fp16", real: bool = False) -> None:
    """The ONNX set engines build from.

    `real=True` runs `mmgen export` (AutoCast mixed-precision FP16 with validation: ~20-50 s on
    two busy cores). Otherwise a quick stand-in (~1.5 s) writes plain FP32 graphs under the
    spec's names with a dynamic batch axis into `onnx/<precision>/`; a strongly typed build takes
    the graph's own types, so they parse and build like the real set (as FP32 engines).
    """
    if real:
        from mmgen_deploy.export import export_run

        export_run(run, precisions=(precision,))
        return
    config = run.load_config()
    components = build_components(load_vqvae(run, config), load_dit(run, config))
    target = run.onnx_dir / precision
    target.mkdir(parents=True, exist_ok=True)
    for name, spec in component_specs(config).items():
        feeds = spec.make_inputs(2, np.random.default_rng(0))
        args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
        dynamic = {t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(components[name], args, str(target / f"{name}.onnx"), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=dynamic, opset_version=17, dynamo=False)


def make_tiny_run(root: Path, real_export: bool = False) -> RunDir:
    """A re-randomised tiny model (a fresh DiT outputs exactly zero) saved as a run with its ONNX set."""
    config = preset("tiny")
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(root, config, vq.eval(), dit.eval())
    export_onnx_set(run, real=real_export)
    return run
