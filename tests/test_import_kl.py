"""KL autoencoder layouts: diffusers AutoencoderKL folders and LDM / Stable Diffusion `.ckpt` first
stages, weight for weight against diffusers' own forward pass; the official DiT `.pt` paired with
a diffusers VAE folder (how DiT-XL-2-256.pt is deployed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_import import NUM_CLASSES, OFFICIAL_CFG, REL_L2, _cli, _official_state, rel_l2

from mmgen_deploy.importers import CheckpointError, read_source
from mmgen_deploy.models import build_components
from mmgen_deploy.models.load import load_models
from mmgen_deploy.rundir import RunDir

diffusers = pytest.importorskip("diffusers")


@torch.no_grad()
def _diffusers_kl(seed: int = 0, **options: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=(32, 32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=32, **options)
    for param in vae.parameters():  # away from the default init, so every tensor matters
        param.add_(torch.randn_like(param) * 0.02)
    return vae.eval()


@torch.no_grad()
def _kl_errors(run: RunDir, vae: torch.nn.Module) -> dict[str, float]:
    _, kl, dit = load_models(run)
    comps = build_components(kl, dit)
    image = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    scale = vae.config.scaling_factor
    return {"encoder": rel_l2(comps["encoder"](image), vae.encode(image).latent_dist.mean * scale),
            "decoder": rel_l2(comps["decoder"](latent), vae.decode(latent / scale).sample)}


def test_official_dit_with_a_diffusers_vae_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mmgen import --dit DiT-XL-2-256.pt --vae sd-vae-ft-ema/`, in small: the KL latent pairs with the DiT."""
    vae = _diffusers_kl(scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "vae")
    torch.save(_official_state(OFFICIAL_CFG), tmp_path / "DiT.pt")
    code, output = _cli(["import", "--dit", str(tmp_path / "DiT.pt"), "--num-heads", "12", "--vae",
                         str(tmp_path / "vae"), "--out", str(tmp_path / "run")], capsys)
    assert code == 0, output
    run = RunDir(tmp_path / "run")
    config = run.load_config()
    assert config.first_stage_kind == "kl" and config.first_stage.image_size == 32
    assert config.dit.num_classes == NUM_CLASSES
    assert "VQ model" not in output  # no warning about pairing an official DiT with a VQ model
    errors = _kl_errors(run, vae)
    print("diffusers AutoencoderKL vs native rel L2:", errors)
    assert all(err <= REL_L2 for err in errors.values()), errors


def test_ldm_kl_ckpt_round_trips(tmp_path: Path) -> None:
    """A Stable Diffusion style .ckpt (first_stage_model.* among other weights, loss.* tensors) gives
    the same autoencoder as the diffusers folder it was written from."""
    vae = _diffusers_kl(seed=3)
    vae.save_pretrained(tmp_path / "vae")
    arch = read_source(tmp_path / "vae").kl
    assert arch is not None
    _, native = arch.build(32)
    state = {f"first_stage_model.{k}": v for k, v in native.state_dict().items()}
    state |= {"first_stage_model.loss.logvar": torch.zeros(()), "model.diffusion_model.input.weight": torch.ones(2)}
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "sd.ckpt")
    found = read_source(tmp_path / "sd.ckpt")
    assert found.kl is not None and found.vq is None
    _, again = found.kl.build(32)
    for key, value in native.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert any("first_stage_model" in note for note in found.kl.notes)
    assert any("0.18215" in note for note in found.kl.notes)  # LDM files do not store the latent scale


def test_diffusers_kl_options_are_checked(tmp_path: Path) -> None:
    _diffusers_kl(shift_factor=0.1, scaling_factor=0.5).save_pretrained(tmp_path / "shifted")
    arch = read_source(tmp_path / "shifted").kl
    assert arch is not None and (arch.scaling_factor, arch.shift_factor) == (0.5, 0.1)
    vae = _diffusers_kl(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    vae.save_pretrained(tmp_path / "per-channel")
    with pytest.raises(CheckpointError, match="latents_mean"):
        read_source(tmp_path / "per-channel")


def test_diffusers_kl_config_must_match_its_weights(tmp_path: Path) -> None:
    """config.json and the weights are read apart; where they disagree the folder is refused, naming both."""
    import json

    from safetensors.torch import load_file, save_file

    _diffusers_kl().save_pretrained(tmp_path / "vae")
    config_path = tmp_path / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"block_out_channels": [32, 64, 64]}))
    with pytest.raises(CheckpointError, match=r"block_out_channels \(32, 64, 64\).*\(32, 32, 64\)"):
        read_source(tmp_path / "vae")
    config_path.write_text(json.dumps(config | {"layers_per_block": 2}))
    with pytest.raises(CheckpointError, match=r"layers_per_block 2 .*\(1\)"):
        read_source(tmp_path / "vae")
    config_path.write_text(json.dumps(config))
    weights = next((tmp_path / "vae").glob("*.safetensors"))
    save_file(load_file(weights) | {"quantize.embedding.weight": torch.zeros(8, 4)}, weights)
    with pytest.raises(CheckpointError, match=r"not part of a diffusers AutoencoderKL: quantize\.embedding\.weight"):
        read_source(tmp_path / "vae")


def test_kl_vae_given_as_vq_is_redirected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _diffusers_kl().save_pretrained(tmp_path / "vae")
    torch.save(_official_state(OFFICIAL_CFG), tmp_path / "DiT.pt")
    code, output = _cli(["import", "--dit", str(tmp_path / "DiT.pt"), "--num-heads", "12", "--vq",
                         str(tmp_path / "vae"), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--vae PATH" in output and not (tmp_path / "run").exists()
