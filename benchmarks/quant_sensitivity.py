r"""Which parts of a component must stay in high precision for INT8 / FP8? Measure, don't assume.

For each component and 8-bit mode, quantizes the run's FP32 graph (exported here into a temporary
folder) with, one variant at a time, a set of module scopes kept out of quantization in place of
the spec's `quant_exclude_scopes` (the FP32 scopes, e.g. the timestep embedding, always stay out),
and prints the relative L2 error against PyTorch FP32 on real (calibration-like, held-out) and
random inputs. Prints figures only; asserts nothing.

    PYTHONPATH=$PWD python benchmarks/quant_sensitivity.py RUN_DIR [--components denoiser]
        [--modes int8,fp8] [--variant '' --variant dit.final_layer --variant '^/dit/blocks\.\d+/attn/MatMul' ...]
        [--calibration-size 256] [--method max]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from mmgen_deploy.models.load import load_models, load_text_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--components", default="encoder,decoder,denoiser")
    parser.add_argument("--modes", default="int8,fp8")
    parser.add_argument("--variant", action="append", default=[],
                        help="scopes kept out of quantization instead of the spec's, comma-separated (a module "
                             "path, or a node-name regex starting with ^), e.g. dit.final_layer; repeatable; "
                             "'' = none beyond the FP32 scopes; 'spec' = the spec's own")
    parser.add_argument("--calibration-size", type=int, default=256)
    parser.add_argument("--timesteps", type=int, default=8)
    parser.add_argument("--method", default="max")
    parser.add_argument("--high-precision", default="fp16")
    args = parser.parse_args()

    import torch

    from mmgen_deploy.export.calibration import component_inputs, dataset_calibration, load_calibration
    from mmgen_deploy.export.exporter import torch_threads
    from mmgen_deploy.export.onnx_export import export_fp32
    from mmgen_deploy.export.quantize import QuantSettings, quantize_component, trajectory_calibration
    from mmgen_deploy.export.quantize_export import quantization_data
    from mmgen_deploy.export.validate import ort_session, random_input_sets, real_input_sets, torch_outputs
    from mmgen_deploy.models import build_components
    from mmgen_deploy.numerics import tensor_diff
    from mmgen_deploy.rundir import RunDir
    from mmgen_deploy.specs import component_specs

    torch.set_num_threads(1)
    run = RunDir(args.run_dir)
    config, vq, dit = load_models(run)
    text_encoder = load_text_encoder(run, config) if config.uses_text else None
    tokenizer = run.load_tokenizer() if config.uses_text else None
    modules = build_components(vq.eval(), dit.eval(), None if text_encoder is None else text_encoder.eval())
    specs = component_specs(config)
    settings = QuantSettings(calibration_size=args.calibration_size, timesteps=args.timesteps, method=args.method,
                             high_precision=args.high_precision)
    data = quantization_data(None, run.read_meta(), config, settings)
    calib, description = trajectory_calibration(data, config, modules, settings, tokenizer=tokenizer)
    print(f"calibration: {description['denoiser']['samples']} denoiser samples at timesteps "
          f"{description['denoiser']['timesteps']}, {description['encoder']['samples']} images")
    # Held-out real inputs: the parity's own (other images, random timesteps), not the calibration set.
    held, _ = component_inputs(load_calibration(dataset_calibration(run.read_meta())[0], config), config, specs,
                               modules, seed=1, tokenizer=tokenizer)
    variants = args.variant or ["spec"]
    with tempfile.TemporaryDirectory() as work, torch_threads(1):
        for name in args.components.split(","):
            spec, module = specs[name], modules[name]
            fp32 = Path(work) / f"{name}.onnx"
            export_fp32(module, spec, fp32)
            sets = random_input_sets(spec, specs, modules)[:2] + real_input_sets(spec, held[name])[:2]
            references = [torch_outputs(module, spec, s.tensors) for s in sets]
            for mode in args.modes.split(","):
                for variant in variants:
                    extra = spec.quant_exclude_scopes if variant == "spec" else \
                        tuple(v.strip() for v in variant.split(",") if v.strip())
                    varied = dataclasses.replace(spec, quant_exclude_scopes=extra)
                    out = Path(work) / f"{name}.{mode}.onnx"
                    started = time.perf_counter()
                    record = quantize_component(fp32, varied, out, mode, calib[name], settings)
                    seconds = time.perf_counter() - started
                    session = ort_session(out, has_group_norms=spec.has_group_norms)
                    errors: dict[str, float] = {}
                    for s, ref in zip(sets, references, strict=True):
                        got = session.run(spec.output_names, s.tensors)
                        for tensor, r, g in zip(spec.outputs, ref, got, strict=True):
                            if tensor.is_float:
                                key = f"{tensor.name}/{s.kind}"
                                errors[key] = max(errors.get(key, 0.0), tensor_diff(r, g).rel_l2)
                    shown = " ".join(f"{k}={v:.2e}" for k, v in errors.items())
                    print(f"{name:13s} {mode} excl=[{variant or 'none'}] q={record.get('quantized_nodes')} "
                          f"high={len(record.get('high_precision_compute_nodes', []))} {shown} ({seconds:.1f} s)",
                          flush=True)
    _ = np


if __name__ == "__main__":
    main()
