from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen_deploy.config import DiTConfig, KLConfig, ModelConfig, preset
from mmgen_deploy.errors import ConfigError
from mmgen_deploy.models import DiT, VQModel, build_components
from mmgen_deploy.models.vqvae import VectorQuantizer
from mmgen_deploy.specs import component_specs


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_component_shapes_and_dtypes_follow_spec(random_models, batch: int) -> None:
    config, vq, dit = random_models
    comps = build_components(vq, dit)
    specs = component_specs(config)
    rng = np.random.default_rng(0)
    for name, spec in specs.items():
        feeds = spec.make_inputs(batch, rng)
        assert set(feeds) == set(spec.input_names)
        for tensor in spec.inputs:
            assert feeds[tensor.name].shape == tensor.concrete_shape(batch)
            assert str(feeds[tensor.name].dtype) == tensor.dtype
        with torch.no_grad():
            out = comps[name](*(torch.from_numpy(feeds[n]) for n in spec.input_names))
        outs = out if isinstance(out, tuple) else (out,)
        assert len(outs) == len(spec.outputs)
        for tensor, value in zip(spec.outputs, outs, strict=True):
            assert tuple(value.shape) == tensor.concrete_shape(batch), (name, tensor.name)
            assert str(value.dtype).removeprefix("torch.") == tensor.dtype, (name, tensor.name)


def test_quantizer_matches_brute_force_nearest_code(random_models) -> None:
    _, vq, _ = random_models
    h = torch.randn(4, vq.config.embed_dim, 8, 8)
    with torch.no_grad():
        z_q, indices = vq.quantize.quantize(h)
    codes = vq.quantize.embedding.weight
    vectors = h.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    # Brute force: explicit difference vectors, no algebraic shortcut.
    brute = torch.stack([((codes - v) ** 2).sum(1).argmin() for v in vectors]).reshape(4, 8, 8)
    assert torch.equal(indices.long(), brute)
    assert torch.equal(z_q, codes[brute].permute(0, 3, 1, 2))


def test_fresh_dit_outputs_zero_and_rerandomised_does_not(tiny_config, random_models) -> None:
    fresh = DiT(tiny_config.dit).eval()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10.0, 500.0])
    y = torch.tensor([0, 3], dtype=torch.int32)
    with torch.no_grad():
        assert torch.count_nonzero(fresh(x, t, y)) == 0
        assert random_models[2](x, t, y).abs().mean() > 1e-3


def test_quantizer_training_path_updates_codebook_and_gives_straight_through_grad(tiny_config) -> None:
    vq = VQModel(tiny_config.first_stage).train()
    before = vq.quantize.embedding.weight.clone()
    image = torch.rand(4, 3, 32, 32) * 2 - 1
    recon, q_loss, indices = vq(image)
    (torch.nn.functional.mse_loss(recon, image) + q_loss).backward()
    assert not torch.equal(before, vq.quantize.embedding.weight)  # EMA update + dead-code restart
    assert vq.encoder.conv_in.weight.grad is not None  # gradient passed through the quantizer
    assert indices.dtype == torch.int32


def test_unused_codes_restart_within_a_short_run() -> None:
    # Half the codebook far from every latent: those codes never win. They must be moved onto
    # the data within a few steps (the tiny recipe trains 500), not after hundreds.
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 2).train()
    with torch.no_grad():
        codes = torch.cat([torch.randn(8, 2), torch.full((8, 2), 100.0)])
        quantizer.embedding.weight.copy_(codes)
        quantizer.ema_embed_sum.copy_(codes)
        quantizer.ema_cluster_size.fill_(1.0)
    for _ in range(5):
        quantizer(torch.randn(4, 2, 8, 8))
    assert quantizer.embedding.weight.abs().max() < 10.0
    _, indices = quantizer.quantize(torch.randn(64, 2, 8, 8))
    assert quantizer.usage(indices)[0] > 0.9


def test_diffusers_variant_changes_timestep_frequencies(tiny_config) -> None:
    official = DiT(tiny_config.dit)
    variant = DiT(tiny_config.dit.replace(timestep_freq_shift=1.0, mlp_norm_eps=1e-5))
    variant.load_state_dict(official.state_dict())
    t = torch.tensor([999.0])
    assert not torch.allclose(official.t_embedder(t), variant.t_embedder(t))


def test_presets_and_validation() -> None:
    for name in ("tiny", "S/2", "B/2"):
        cfg = preset(name)
        assert cfg.dit.input_size == cfg.first_stage.latent_size
    with pytest.raises(ConfigError, match="divisible"):
        preset("tiny").first_stage.replace(image_size=30)
    with pytest.raises(ConfigError, match="patch_size"):
        preset("tiny").dit.replace(patch_size=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("Q/2")
    bad = preset("tiny")
    with pytest.raises(ConfigError, match="in_channels"):
        ModelConfig(first_stage=bad.first_stage, dit=bad.dit.replace(in_channels=8)).validate()


def test_model_config_dict_keeps_its_on_disk_keys_and_reads_both_forms() -> None:
    kl = ModelConfig(first_stage=KLConfig(image_size=32, base_channels=32, channel_mult=(1, 2, 2)),
                     dit=DiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2))
    data = kl.to_dict()
    assert list(data) == ["vq", "dit", "diffusion", "class_names", "text", "first_stage"]
    assert data["first_stage"] == "kl" and data["vq"]["scaling_factor"] == kl.first_stage.scaling_factor
    assert ModelConfig.from_dict(data) == kl
    renamed = {**{k: v for k, v in data.items() if k != "vq"}, "first_stage": data["vq"], "first_stage_kind": "kl"}
    assert ModelConfig.from_dict(renamed) == kl
    assert ModelConfig.from_dict(preset("tiny").to_dict()) == preset("tiny")


def test_state_dict_keys_follow_public_layouts(tiny_config) -> None:
    vq_keys = set(VQModel(tiny_config.first_stage).state_dict())
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
                "encoder.down.0.downsample.conv.weight", "encoder.mid.attn_1.q.weight",
                "decoder.up.1.upsample.conv.weight", "quantize.embedding.weight",
                "quant_conv.weight", "post_quant_conv.weight"):
        assert key in vq_keys, key
    dit_keys = set(DiT(tiny_config.dit).state_dict())
    for key in ("x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight"):
        assert key in dit_keys, key
