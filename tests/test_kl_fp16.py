"""FP16 of a KL decoder whose activations exceed FP16's range: AutoCast keeps FP32 what overflows
(the evidence is in the manifest) and the graph passes FP16 parity; a plain FP16 conversion of the
same graph does not.

Stable Diffusion's VAE decoder is the textbook case (its mid/up blocks reach activations beyond
65504 and decode to NaN/black in plain FP16); here a small random one is pushed there by scaling
the weights of the decoder's first convolution, so its whole residual stream runs at ~1e5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mmgen_deploy.config import DiTConfig, KLConfig, ModelConfig
from mmgen_deploy.export import export_models
from mmgen_deploy.models import AutoencoderKL, DiT, KLDecoderComponent, rerandomize_
from mmgen_deploy.numerics import tensor_diff
from mmgen_deploy.specs import component_specs

pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt is not installed (fp16 extra)")
pytest.importorskip("onnxruntime")

FP16_MAX = 65504.0


def _overflowing_model() -> tuple[ModelConfig, AutoencoderKL, DiT]:
    kl_cfg = KLConfig(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    config = ModelConfig(first_stage=kl_cfg, dit=DiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=1,
                                                   num_heads=2, num_classes=4))
    torch.manual_seed(0)
    kl, dit = AutoencoderKL(kl_cfg).eval(), DiT(config.dit).eval()
    rerandomize_(dit, seed=1)
    with torch.no_grad():
        kl.decoder.conv_in.weight.mul_(2e4)
        kl.decoder.conv_in.bias.mul_(2e4)
    return config, kl, dit


def _largest_activation(kl: AutoencoderKL, latent: torch.Tensor) -> float:
    peak = 0.0

    def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal peak
        peak = max(peak, float(output.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in kl.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        kl.decode(latent)
    for handle in handles:
        handle.remove()
    return peak


def _run(path: Path, latent: np.ndarray) -> np.ndarray:
    """The graph run with the ONNX reference evaluator: NumPy in each tensor's own dtype, so FP16
    nodes compute (and overflow) in FP16. ONNX Runtime's CPU provider is no judge of that: it has
    no FP16 kernels for Conv and friends and runs them in FP32 behind casts it then merges away
    (measured: the plain FP16 graph below stays finite there, rel L2 4.5e-4)."""
    from onnx.reference import ReferenceEvaluator

    with np.errstate(all="ignore"):
        return np.asarray(ReferenceEvaluator(str(path)).run(None, {"latent": latent})[0], dtype=np.float32)


def test_overflowing_kl_decoder_is_kept_fp32_where_needed(tmp_path: Path) -> None:
    config, kl, dit = _overflowing_model()
    spec = component_specs(config)["decoder"]
    latent = spec.make_inputs(2, np.random.default_rng(5))["latent"]
    assert _largest_activation(kl, torch.from_numpy(latent)) > 2 * FP16_MAX  # the premise: FP16 overflows

    # The mixed-precision export validates FP16 in ONNX Runtime against PyTorch FP32 (rel L2 <= 1e-2
    # at batch 1, 3 and 16 on random inputs) and raises if it misses.
    result = export_models(config, kl, dit, tmp_path / "onnx", components=("decoder",))
    record = result["files"]["fp16"]["decoder"]
    assert record["validation"]["passed"]
    worst = max(row["value"] for row in record["validation"]["worst"])
    reasons = record["converter"]["fp32_reasons"]
    out_of_range = {n: r for n, r in reasons.items() if "out of range" in r}
    print("kept FP32:", len(record["kept_fp32_nodes"]), "of", len(record["kept_fp32_nodes"]) + record["fp16_nodes"],
          "nodes; out of range:", sorted(out_of_range), "worst:", worst)
    assert any("conv_in" in n for n in out_of_range), reasons  # the scaled convolution, by its range
    assert all("absmax" in r for r in out_of_range.values())  # with the measured range as evidence
    assert record["fp16_nodes"] > 0  # not simply everything FP32

    fp16_file, fp32_file = tmp_path / "onnx" / "fp16" / "decoder.onnx", tmp_path / "onnx" / "fp32" / "decoder.onnx"
    with torch.no_grad():
        reference = KLDecoderComponent(kl)(torch.from_numpy(latent)).numpy()
    mixed = tensor_diff(reference, _run(fp16_file, latent))
    assert mixed.rel_l2 <= spec.tolerance("fp16", "image").rel_l2, mixed

    # The same graph converted to FP16 everywhere (no range analysis, no FP32 op types).
    from modelopt.onnx.autocast import convert_to_mixed_precision

    plain = convert_to_mixed_precision(str(fp32_file), low_precision_type="fp16", keep_io_types=True,
                                       data_max=float("inf"), init_max=float("inf"), providers=["cpu"])
    plain_file = tmp_path / "plain.onnx"
    onnx.save(plain, str(plain_file))
    plain_out = _run(plain_file, latent)
    plain_diff = tensor_diff(reference, plain_out)
    print(f"mixed FP16 rel L2 {mixed.rel_l2:.2e}; plain FP16: finite {np.isfinite(plain_out).mean():.0%}, "
          f"rel L2 {plain_diff.rel_l2:.2e}")
    assert not (np.isfinite(plain_out).all() and plain_diff.rel_l2 <= spec.tolerance("fp16", "image").rel_l2)


def test_8_bit_calibration_follows_the_kl_first_stage() -> None:
    """INT8/FP8 calibration feeds a KL decoder the encoder's latents (no quantizer, no codes)."""
    from mmgen_deploy.export.calibration import CalibrationData
    from mmgen_deploy.export.quantize import QuantSettings, trajectory_calibration
    from mmgen_deploy.models import build_components

    config, kl, dit = _overflowing_model()
    images = np.random.default_rng(0).uniform(-1, 1, (8, 3, 16, 16)).astype(np.float32)
    labels = np.arange(8, dtype=np.int32) % config.dit.num_classes
    inputs, description = trajectory_calibration(CalibrationData(images, labels, "test"), config,
                                                 build_components(kl, dit), QuantSettings(calibration_size=16,
                                                                                          timesteps=2, images=8))
    assert set(inputs) == {"encoder", "decoder", "denoiser"} and "quantizer" not in description
    with torch.no_grad():
        latents = kl.encode(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(inputs["decoder"]["latent"], latents, rtol=1e-5, atol=1e-6)
    assert inputs["denoiser"]["x_t"].shape[1:] == latents.shape[1:]
