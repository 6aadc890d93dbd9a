"""`mmgen import`: diffusers, official DiT and taming VQ layouts against their own forward passes.

Every model here is built offline with random weights; layers that start at zero
(adaLN-Zero, codebooks) are re-randomised so that a passing comparison means something.
"""

from __future__ import annotations

import argparse
import builtins
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmgen_deploy.cli.app import main
from mmgen_deploy.cli.common import describe_error
from mmgen_deploy.config import DiTConfig, VQConfig
from mmgen_deploy.importers import CheckpointError, import_official_dit, import_run, official_dit_keys, read_source
from mmgen_deploy.models import DiT, VQModel, build_components, rerandomize_
from mmgen_deploy.models.dit import sincos_pos_embed_2d
from mmgen_deploy.models.load import load_models
from mmgen_deploy.rundir import RunDir

diffusers = pytest.importorskip("diffusers")

# Acceptance threshold: native vs the layout's own forward pass, both in FP32.
REL_L2 = 1e-5


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


# -- diffusers fixtures ---------------------------------------------------------------------------------------

NUM_CLASSES = 5


@torch.no_grad()
def _diffusers_dit(seed: int = 0, in_channels: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    dit = diffusers.DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=in_channels, out_channels=2 * in_channels, num_layers=2,
        num_attention_heads=2, attention_head_dim=16, num_embeds_ada_norm=NUM_CLASSES)
    gen = torch.Generator().manual_seed(seed + 1)
    for param in dit.parameters():
        if torch.count_nonzero(param) == 0:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    # diffusers initialises each block's embedder copy independently; a converted DiT has them equal.
    shared = dit.transformer_blocks[0].norm1.emb.state_dict()
    for block in dit.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    return dit.eval()


@torch.no_grad()
def _diffusers_vq(seed: int = 0, embed_dim: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    vq = diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
        layers_per_block=1, latent_channels=4, vq_embed_dim=embed_dim, sample_size=16, num_vq_embeddings=64,
        norm_num_groups=32)
    # A trained-looking codebook: well-separated codes, roughly the scale of the encoder's output.
    vq.quantize.embedding.weight.copy_(torch.randn(64, embed_dim, generator=torch.Generator().manual_seed(seed)))
    return vq.eval()


def _diffusers_pipeline(root: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A pipeline-shaped folder: vqvae/, transformer/, scheduler/ and model_index.json."""
    vq, dit = _diffusers_vq(), _diffusers_dit()
    vq.save_pretrained(root / "vqvae")
    dit.save_pretrained(root / "transformer")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=2e-4, beta_end=0.03,
                            variance_type="learned_range").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "vqvae": ["diffusers", "VQModel"],
        "transformer": ["diffusers", "DiTTransformer2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return vq, dit


@torch.no_grad()
def _compare_with_diffusers(run: RunDir, vq: torch.nn.Module, dit: torch.nn.Module) -> dict[str, float]:
    _, native_vq, native_dit = load_models(run)
    comps = build_components(native_vq, native_dit)
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1
    h_ref = vq.encode(image).latents
    h = comps["encoder"](image)
    z_q, indices = comps["quantizer"](h_ref)
    z_q_ref, _, (_, _, indices_ref) = vq.quantize(h_ref)
    x_t = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0.0, 17.0, 500.0, 999.0])
    y = torch.tensor([0, 2, 4, NUM_CLASSES])  # includes the null label used by guidance
    errors = {
        "encoder": rel_l2(h, h_ref),
        "quantizer": rel_l2(z_q, z_q_ref),
        "decoder": rel_l2(comps["decoder"](z_q_ref), vq.decode(h_ref).sample),
        "denoiser": rel_l2(comps["denoiser"](x_t, t, y.int()), dit(x_t, timestep=t, class_labels=y).sample),
    }
    assert torch.equal(indices.reshape(-1).long(), indices_ref.reshape(-1).long())
    return errors


def test_diffusers_pipeline_import_matches_diffusers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vq, dit = _diffusers_pipeline(tmp_path / "pipe")
    code, output = _cli(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run"),
                         "--json", str(tmp_path / "report.json")], capsys)
    assert code == 0, output
    run = RunDir(tmp_path / "run")
    config = run.load_config()
    assert config.dit.timestep_freq_shift == 1.0 and config.dit.mlp_norm_eps == 1e-5
    assert config.dit.learn_sigma and config.first_stage.attn_resolutions == (8,)
    assert config.class_names == tuple(f"class {i}" for i in range(NUM_CLASSES))
    # The scheduler next to the transformer was read (these betas are not the defaults).
    assert (config.diffusion.beta_start, config.diffusion.beta_end) == (2e-4, 0.03)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["imported"]["vqvae"]["scaling_factor"] == pytest.approx(0.18215)
    errors = _compare_with_diffusers(run, vq, dit)
    print("diffusers pipeline rel L2:", errors)
    assert all(err <= REL_L2 for err in errors.values()), errors


def test_diffusers_flags_are_needed_for_parity(tmp_path: Path) -> None:
    """Without diffusers' timestep shift and MLP eps the outputs differ: the flags are doing the work."""
    dit = _diffusers_dit()
    dit.save_pretrained(tmp_path / "dit")
    imported = read_source(tmp_path / "dit").dit
    assert imported is not None
    plain = DiT(imported.config.replace(timestep_freq_shift=0.0, mlp_norm_eps=1e-6)).eval()
    plain.load_state_dict(imported.model.state_dict())
    x_t, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([1, 3])
    with torch.no_grad():
        ref = dit(x_t, timestep=t, class_labels=y).sample
        assert rel_l2(imported.model(x_t, t, y), ref) <= REL_L2
        assert rel_l2(plain(x_t, t, y), ref) > 1e-4


def test_diffusers_dit_with_different_block_embedders_is_refused(tmp_path: Path) -> None:
    dit = _diffusers_dit()
    with torch.no_grad():
        dit.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(0.01)
    dit.save_pretrained(tmp_path / "dit")
    with pytest.raises(CheckpointError, match=r"embedder of block 1 .*differs from block 0"):
        read_source(tmp_path / "dit")


# -- official DiT layout, built from the key list ------------------------------------------------------------

def _official_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of facebookresearch/DiT models.py, written out from the paper's architecture."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    mlp = int(d * cfg.mlp_ratio)
    out = p * p * (2 * c if cfg.learn_sigma else c)
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, cfg.num_patches, d), "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (cfg.num_classes + 1, d),
        "final_layer.linear.weight": (out, d), "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    for i in range(cfg.depth):
        for name, (rows, cols) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (mlp, d),
                                   "mlp.fc2": (d, mlp), "adaLN_modulation.1": (6 * d, d)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    return shapes


def _official_state(cfg: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = _official_shapes(cfg)
    assert list(shapes) != [] and set(shapes) == set(official_dit_keys(cfg.depth))
    state = {k: torch.randn(s, generator=gen) * (0.3 / math.sqrt(s[-1])) for k, s in shapes.items()}
    grid = cfg.input_size // cfg.patch_size
    state["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(cfg.hidden_size, grid)).unsqueeze(0)
    return state


def _official_reference(state: dict[str, torch.Tensor], cfg: DiTConfig, x: torch.Tensor, t: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
    """DiT's forward written directly from models.py with functional ops on the state dict (the oracle)."""
    s, d, p, heads = state, cfg.hidden_size, cfg.patch_size, cfg.num_heads

    def linear(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(h, s[f"{name}.weight"], s[f"{name}.bias"])

    def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    h = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + s["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + s["y_embedder.embedding_table.weight"][y]
    b, n, _ = h.shape
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        mods = linear(F.silu(c), pre + "adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (d,), eps=1e-6), mods[0], mods[1])
        qkv = linear(a, pre + "attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1)) * (d // heads) ** -0.5
        out = (att.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, d)
        h = h + mods[2].unsqueeze(1) * linear(out, pre + "attn.proj")
        m = modulate(F.layer_norm(h, (d,), eps=1e-6), mods[3], mods[4])
        m = linear(F.gelu(linear(m, pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
        h = h + mods[5].unsqueeze(1) * m
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(F.layer_norm(h, (d,), eps=1e-6), shift, scale), "final_layer.linear")
    g, co = cfg.input_size // p, cfg.out_channels
    h = h.reshape(b, g, g, p, p, co)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, co, g * p, g * p)


OFFICIAL_CFG = DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=96, depth=2, num_heads=12,
                         num_classes=NUM_CLASSES, learn_sigma=True)


def test_native_dit_keys_are_the_official_key_list() -> None:
    assert list(DiT(OFFICIAL_CFG).state_dict()) == official_dit_keys(OFFICIAL_CFG.depth)


def test_official_train_checkpoint_matches_reference_forward(tmp_path: Path) -> None:
    ema, model = _official_state(OFFICIAL_CFG, seed=1), _official_state(OFFICIAL_CFG, seed=2)
    # train.py's dict: model, ema, optimizer state and the argparse.Namespace of its arguments.
    ckpt = {"model": model, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "args": argparse.Namespace(model="DiT-B/2", image_size=64, num_classes=NUM_CLASSES, global_seed=0)}
    torch.save(ckpt, tmp_path / "0000100.pt")
    found = read_source(tmp_path / "0000100.pt")
    assert found.dit is not None and found.dit.config == OFFICIAL_CFG  # heads from args.model "DiT-B"
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([3.0, 250.0, 999.0])
    y = torch.tensor([0, 4, NUM_CLASSES])
    with torch.no_grad():
        error = rel_l2(found.dit.model(x, t, y), _official_reference(ema, OFFICIAL_CFG, x, t, y))
    print("official DiT (ema) rel L2:", error)
    assert error <= REL_L2
    assert any("EMA" in note for note in found.dit.notes)


def test_official_raw_state_dict_needs_heads_when_width_is_unusual(tmp_path: Path) -> None:
    cfg = OFFICIAL_CFG.replace(hidden_size=64, num_heads=4)
    torch.save(_official_state(cfg), tmp_path / "DiT-custom.pt")
    with pytest.raises(CheckpointError, match="pass num_heads N") as refused:
        read_source(tmp_path / "DiT-custom.pt")
    assert describe_error(refused.value).endswith("(pass --num-heads N)")
    found = read_source(tmp_path / "DiT-custom.pt", num_heads=4)
    assert found.dit is not None and found.dit.config == cfg


def test_official_layout_problems_are_named() -> None:
    state = _official_state(OFFICIAL_CFG)
    bad_pos = dict(state, pos_embed=state["pos_embed"] + 0.01)
    with pytest.raises(CheckpointError, match="pos_embed differs from the 2-D sin-cos table"):
        import_official_dit(bad_pos, "bad.pt", num_heads=12)
    shaped = dict(state)
    shaped["blocks.1.mlp.fc2.weight"] = torch.zeros(96, 100)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc2\.weight: file \(96, 100\) vs model \(96, 384\)"):
        import_official_dit(shaped, "shaped.pt", num_heads=12)
    keys = dict(state, extra_head=torch.zeros(1))
    del keys["blocks.0.attn.proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys blocks\.0\.attn\.proj\.bias; unknown keys extra_head"):
        import_official_dit(keys, "keys.pt", num_heads=12)


# -- taming / LDM VQ ------------------------------------------------------------------------------------------

TAMING_CFG = VQConfig(image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                      attn_resolutions=(16,), z_channels=4, embed_dim=4, n_embed=128, use_ema=False)


def _taming_ckpt(path: Path, vq: VQModel) -> None:
    """An LDM-style Lightning checkpoint: first_stage_model.* weights, loss.* tensors, other modules."""
    state = {f"first_stage_model.{k}": v for k, v in vq.state_dict().items() if not k.startswith("quantize.ema_")}
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.2"}, path)


def test_taming_ckpt_round_trips_and_pairs_with_official_dit(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    vq = rerandomize_(VQModel(TAMING_CFG), seed=5).eval()
    _taming_ckpt(tmp_path / "vq-f4.ckpt", vq)
    torch.save(_official_state(OFFICIAL_CFG), tmp_path / "DiT.pt")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(NUM_CLASSES)))
    code, output = _cli(["import", "--vq", str(tmp_path / "vq-f4.ckpt"), "--dit", str(tmp_path / "DiT.pt"),
                         "--class-names", str(names), "--num-heads", "12", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, output
    config, vq2, _ = load_models(RunDir(tmp_path / "run"))
    assert config.first_stage == TAMING_CFG  # architecture (incl. attention placement) read back from shapes
    assert config.class_names[-1] == f"thing {NUM_CLASSES - 1}"
    assert "dropped 2 loss.* tensors" in output
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vq2.decode(vq2.quantize.quantize(vq2.encode(image))[0]),
                           vq.decode(vq.quantize.quantize(vq.encode(image))[0]))


def test_taming_layout_matches_diffusers_vq(tmp_path: Path) -> None:
    """A diffusers VQModel's weights written in the taming layout import to the same forward pass."""
    dvq = _diffusers_vq(seed=4)
    dvq.save_pretrained(tmp_path / "vq")
    arch = read_source(tmp_path / "vq").vq
    assert arch is not None
    _, via_diffusers = arch.build(16)
    _taming_ckpt(tmp_path / "taming.ckpt", via_diffusers)
    taming = read_source(tmp_path / "taming.ckpt").vq
    assert taming is not None
    _, native = taming.build(16)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        h_ref = dvq.encode(image).latents
        errors = {"encode": rel_l2(native.encode(image), h_ref),
                  "decode": rel_l2(native.decode(native.quantize.quantize(h_ref)[0]), dvq.decode(h_ref).sample)}
    print("taming-layout VQ vs diffusers rel L2:", errors)
    assert all(err <= REL_L2 for err in errors.values()), errors


def test_kl_checkpoint_without_its_encoder_levels_is_refused_by_name(tmp_path: Path) -> None:
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}}, tmp_path / "kl.ckpt")
    with pytest.raises(CheckpointError, match="not a LDM AutoencoderKL model"):
        read_source(tmp_path / "kl.ckpt")


# -- pairing and bad input -----------------------------------------------------------------------------------

def test_pairing_mismatch_is_refused_without_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _diffusers_vq(embed_dim=3).save_pretrained(tmp_path / "vq3")
    _diffusers_dit().save_pretrained(tmp_path / "dit")
    code, output = _cli(["import", "--vq", str(tmp_path / "vq3"), "--dit", str(tmp_path / "dit"),
                         "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "4-channel latents" in output and "3-channel" in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    # An existing run survives a failed --overwrite import untouched.
    _diffusers_vq().save_pretrained(tmp_path / "vq4")
    assert _cli(["import", "--vq", str(tmp_path / "vq4"), "--dit", str(tmp_path / "dit"),
                 "--out", str(tmp_path / "run")], capsys)[0] == 0
    before = RunDir(tmp_path / "run").weights_sha256()
    code, output = _cli(["import", "--vq", str(tmp_path / "vq3"), "--dit", str(tmp_path / "dit"),
                         "--out", str(tmp_path / "run"), "--overwrite"], capsys)
    assert code == 2 and RunDir(tmp_path / "run").weights_sha256() == before
    code, output = _cli(["import", "--vq", str(tmp_path / "vq4"), "--dit", str(tmp_path / "dit"),
                         "--out", str(tmp_path / "run"), "--image-size", "64", "--overwrite"], capsys)
    assert code == 2 and "--image-size 16" in output


def test_lone_official_dit_asks_for_a_vq_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_official_state(OFFICIAL_CFG), tmp_path / "DiT.pt")
    code, output = _cli(["import", str(tmp_path / "DiT.pt"), "--num-heads", "12", "--out", str(tmp_path / "run")],
                        capsys)
    assert code == 2 and "--vae PATH" in output and "KL-f8" in output


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 5"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      writer: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "DiT-XL-2-256x256.pt"
    payload = {"model": _Payload(marker), "ema": {"pos_embed": torch.zeros(1)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))
    code, output = _cli(["import", "--dit", str(path), "--vq", str(path), "--out", str(tmp_path / "run")], capsys)
    # Whatever the pickle's form (protocol 5 framing is refused before the loader reaches the payload),
    # the refusal says what loading it would do and names the call, read from its instructions.
    assert code == 1 and "this file would run code when loaded (it calls `builtins.exec`" in output, output
    assert len(output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "run").exists()
    # The file really is malicious: an unrestricted load runs the payload (the check above can fail).
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.read_text() == "pwned"


def test_a_plain_data_pickle_is_not_called_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"ema": {"pos_embed": [0.0, 1.0]}}, protocol=5))
    code, output = _cli(["import", "--dit", str(path), "--vq", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "a pickle in a form the safe loader does not read" in output, output
    assert "run code" not in output and not (tmp_path / "run").exists()


def test_only_namespace_is_allowed_beyond_tensors(tmp_path: Path) -> None:
    state = _official_state(OFFICIAL_CFG)
    torch.save({"ema": state, "args": argparse.Namespace(model="DiT-B/2", results_dir=Path("/x"))},
               tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="pathlib"):
        read_source(tmp_path / "ckpt.pt")


def test_wrong_class_name_count_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _diffusers_pipeline(tmp_path / "pipe")
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    code, output = _cli(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run"),
                         "--class-names", str(tmp_path / "names.txt")], capsys)
    assert code == 2 and "2 class names but the DiT has 5 classes" in output


# -- the exported ONNX of an imported model ------------------------------------------------------------------

def test_exported_onnx_of_imported_pipeline_matches_diffusers(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    vq, dit = _diffusers_pipeline(tmp_path / "pipe")
    import_run(tmp_path / "run", source=tmp_path / "pipe")
    run = RunDir(tmp_path / "run")
    paths = _export_fp32(run)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    x_t = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([5.0, 700.0], dtype=np.float32)
    y = np.array([1, NUM_CLASSES], dtype=np.int32)

    def session(name: str) -> object:
        return ort.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"])

    with torch.no_grad():
        h_ref = vq.encode(torch.from_numpy(image)).latents
        z_q_ref = vq.quantize(h_ref)[0]
        errors = {
            "encoder": rel_l2(torch.from_numpy(session("encoder").run(None, {"image": image})[0]), h_ref),
            "decoder": rel_l2(torch.from_numpy(session("decoder").run(None, {"z_q": z_q_ref.numpy()})[0]),
                              vq.decode(h_ref).sample),
            "denoiser": rel_l2(torch.from_numpy(session("denoiser").run(
                None, {"x_t": x_t, "t": t, "class_ids": y})[0]),
                dit(torch.from_numpy(x_t), timestep=torch.from_numpy(t),
                    class_labels=torch.from_numpy(y).long()).sample),
        }
    print("exported ONNX FP32 vs diffusers rel L2:", errors)
    assert all(err <= REL_L2 for err in errors.values()), errors


def _export_fp32(run: RunDir) -> dict[str, Path]:
    """FP32 ONNX of the components through the project's exporter, as `mmgen export` does it."""
    from mmgen_deploy.export import export_run, onnx_path

    export_run(run.root, precisions=("fp32",), components=("encoder", "decoder", "denoiser"))
    return {name: Path(onnx_path(run.root, "fp32", name)) for name in ("encoder", "decoder", "denoiser")}


def test_ldm_ema_copy_is_preferred(tmp_path: Path) -> None:
    """latent-diffusion's LitEma stores `model_ema.<name without dots>`; those weights are the ones imported."""
    torch.manual_seed(0)
    vq = rerandomize_(VQModel(TAMING_CFG), seed=6).eval()
    state = {k: v for k, v in vq.state_dict().items() if not k.startswith("quantize.ema_")}
    ema = {f"model_ema.{k.replace('.', '')}": v + 0.5 for k, v in state.items()}
    ema |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}
    torch.save({"state_dict": state | ema}, tmp_path / "ema.ckpt")
    arch = read_source(tmp_path / "ema.ckpt").vq
    assert arch is not None and any("EMA copy" in note for note in arch.notes)
    _, imported = arch.build(32)
    assert torch.equal(imported.encoder.conv_in.weight, vq.encoder.conv_in.weight + 0.5)


def test_dit_pipeline_with_kl_vae_pairs_with_given_vq(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DiTPipeline folder ships a KL VAE; --vq replaces it (with a note) by a VQ model."""
    pipe = tmp_path / "dit-pipeline"
    _diffusers_dit().save_pretrained(pipe / "transformer")
    # Older pipelines name the transformer class Transformer2DModel (same weights, ada_norm_zero).
    config_file = pipe / "transformer" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"_class_name": "Transformer2DModel"}))
    diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4).save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "transformer": ["diffusers", "Transformer2DModel"]}))
    _diffusers_vq().save_pretrained(tmp_path / "vq")
    code, output = _cli(["import", str(pipe), "--vq", str(tmp_path / "vq"), "--out", str(tmp_path / "run")], capsys)
    assert code == 0, output
    assert "replaced by the one given explicitly" in output
    config = RunDir(tmp_path / "run").load_config()
    assert config.dit.timestep_freq_shift == 1.0 and config.first_stage_kind == "vq"


def test_diffusers_vq_problems_are_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _diffusers_vq().save_pretrained(tmp_path / "vq")
    weights = tmp_path / "vq" / "diffusion_pytorch_model.safetensors"
    original = load_file(str(weights))
    save_file(original | {"decoder.conv_out.bias": torch.zeros(4)}, str(weights))
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias: file \(4,\) vs model \(3,\)"):
        read_source(tmp_path / "vq").vq.build(16)  # type: ignore[union-attr]
    save_file(original | {"encoder.extra_head.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError, match=r"not part of a diffusers VQModel: encoder\.extra_head\.weight"):
        read_source(tmp_path / "vq")


def test_truncated_checkpoint_is_reported_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_official_state(OFFICIAL_CFG), tmp_path / "DiT.pt")
    data = (tmp_path / "DiT.pt").read_bytes()
    (tmp_path / "DiT.pt").write_bytes(data[: len(data) // 2])
    code, output = _cli(["import", "--dit", str(tmp_path / "DiT.pt"), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "not a readable PyTorch checkpoint" in output and len(output.strip().splitlines()) == 1


# -- the layouts real-size models come in, in miniature --------------------------------------------------

def test_sharded_diffusers_folders_import_and_match_diffusers(tmp_path: Path) -> None:
    """save_pretrained(max_shard_size=...) writes *-0000i-of-0000n.safetensors + an index: same model as one file."""
    vq, dit = _diffusers_vq(), _diffusers_dit()
    vq.save_pretrained(tmp_path / "vq", max_shard_size="40KB")
    dit.save_pretrained(tmp_path / "dit", max_shard_size="40KB")
    for folder in ("vq", "dit"):
        assert (tmp_path / folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert len(list((tmp_path / folder).glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 2
    import_run(tmp_path / "run", vq_path=tmp_path / "vq", dit_path=tmp_path / "dit")
    errors = _compare_with_diffusers(RunDir(tmp_path / "run"), vq, dit)
    assert all(err <= REL_L2 for err in errors.values()), errors
    # A precision variant saved in shards (index.fp16.json) is the only weights: read and cast to FP32.
    dit.save_pretrained(tmp_path / "dit16", max_shard_size="40KB", variant="fp16")
    assert (tmp_path / "dit16" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    found = read_source(tmp_path / "dit16").dit
    assert found is not None and found.config == read_source(tmp_path / "dit").dit.config  # type: ignore[union-attr]
    # A missing shard is named, not reported as a missing key deep inside.
    victim = sorted((tmp_path / "dit").glob("diffusion_pytorch_model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"1 of the \d+ shards .* missing \({victim.name}\)"):
        read_source(tmp_path / "dit")


# LDM's first-stage configs (latent-diffusion models/first_stage_models/vq-f8, vq-f4), narrowed to base
# width 32 and 32 px: VQ-f8 = 4 levels, attention at the f8 resolution, 4x4 codes; VQ-f4 = 3 levels,
# no attention outside the middle block, 3 latent channels.
LDM_F8 = VQConfig(image_size=32, base_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                  attn_resolutions=(4,), z_channels=4, embed_dim=4, n_embed=256, use_ema=False)
LDM_F4 = VQConfig(image_size=32, base_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
                  attn_resolutions=(), z_channels=3, embed_dim=3, n_embed=128, use_ema=False)


def _lightning_ckpt(path: Path, vq: VQModel, *, prefix: str) -> None:
    """A full Lightning checkpoint as taming/LDM training writes it: state_dict (with loss.* and maybe under
    first_stage_model.), optimizer states with tensors, callbacks, loop counters."""
    weights = {k: v for k, v in vq.state_dict().items() if not k.startswith("quantize.ema_")}
    state = {f"{prefix}{k}": v for k, v in weights.items()}
    state[f"{prefix}loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    state[f"{prefix}loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    param_state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)} for i in range(2)}
    torch.save({"epoch": 7, "global_step": 120000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
                "callbacks": {"ModelCheckpoint": {"monitor": None, "best_model_score": torch.tensor(0.1),
                                                  "best_model_path": "/logs/last.ckpt"}},
                "optimizer_states": [{"state": param_state, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
                "lr_schedulers": []}, path)


@pytest.mark.parametrize("layout", ["f8", "f4"])
def test_ldm_vq_checkpoints_import_with_their_architecture(tmp_path: Path, layout: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = LDM_F8 if layout == "f8" else LDM_F4
    torch.manual_seed(0)
    vq = rerandomize_(VQModel(cfg), seed=7).eval()
    # LDM's own first-stage checkpoints hold the bare VQ model; an LDM holds it under first_stage_model.
    _lightning_ckpt(tmp_path / f"vq-{layout}.ckpt", vq, prefix="" if layout == "f8" else "first_stage_model.")
    dit_cfg = OFFICIAL_CFG.replace(input_size=cfg.latent_size, in_channels=cfg.embed_dim)
    torch.save(_official_state(dit_cfg), tmp_path / "DiT.pt")
    code, output = _cli(["import", "--vq", str(tmp_path / f"vq-{layout}.ckpt"), "--dit", str(tmp_path / "DiT.pt"),
                         "--num-heads", "12", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, output
    assert "dropped 2 loss.* tensors" in output
    config, native, _ = load_models(RunDir(tmp_path / "run"))
    assert config.first_stage == cfg and config.first_stage.downsample_factor == (8 if layout == "f8" else 4)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = native.encode(image)
        assert torch.equal(h, vq.encode(image)) and h.shape == (2, cfg.embed_dim, cfg.latent_size, cfg.latent_size)
        assert torch.equal(native.decode(native.quantize.quantize(h)[0]), vq.decode(vq.quantize.quantize(h)[0]))


def test_official_xl_raw_state_dict_imports_exports_and_builds(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """DiT-XL/2's geometry (width 1152 = 16 heads of 72, learned sigma) as the released .pt holds it: a raw state
    dict (here one block deep, 2x2 tokens, 4 classes). Heads come from the width; the denoiser exports (FP32 and
    mixed FP16, validated against PyTorch) and builds with TensorRT-RTX like the other presets."""
    xl = DiTConfig(input_size=4, in_channels=4, patch_size=2, hidden_size=1152, depth=1, num_heads=16,
                   num_classes=4, learn_sigma=True)
    state = _official_state(xl, seed=3)
    torch.save(state, tmp_path / "DiT-XL-2-256x256.pt")
    torch.manual_seed(0)
    _lightning_ckpt(tmp_path / "vq-f8.ckpt", rerandomize_(VQModel(LDM_F8), seed=8).eval(), prefix="")
    code, output = _cli(["import", "--vq", str(tmp_path / "vq-f8.ckpt"), "--dit", str(tmp_path / "DiT-XL-2-256x256.pt"),
                         "--out", str(tmp_path / "run")], capsys)
    assert code == 0, output
    run = RunDir(tmp_path / "run")
    config, _, native = load_models(run)
    assert config.dit == xl and config.dit.hidden_size // config.dit.num_heads == 72
    assert "16 heads (from the paper's configuration for width 1152)" in output
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([7.0, 901.0]), torch.tensor([1, 4])
    with torch.no_grad():
        assert rel_l2(native(x, t, y), _official_reference(state, xl, x, t, y)) <= REL_L2

    from mmgen_deploy.export import export_run, onnx_path

    manifest = export_run(run, components=("denoiser",))  # raises if any batch misses its tolerance
    assert set(manifest["files"]) == {"fp32", "fp16"}
    assert manifest["files"]["fp16"]["denoiser"]["fp16_nodes"] > 0
    from mmgen_deploy.engines import load_flavour
    from mmgen_deploy.engines.builder import BuildOptions, build_component
    from mmgen_deploy.errors import NotAvailableError
    from mmgen_deploy.specs import component_specs

    try:
        flavour = load_flavour("tensorrt-rtx")
    except NotAvailableError as exc:
        pytest.skip(f"export checked; engine build skipped: {exc}")
    spec = component_specs(config)["denoiser"]
    plan, _ = build_component(flavour, spec, onnx_path(run.root, "fp16", "denoiser"),
                              BuildOptions(runtime="tensorrt-rtx", precision="fp16", workspace_bytes=1 << 28), b"")
    assert len(plan) > 20_000_000  # the FP16 weights (24M parameters) are in the plan
