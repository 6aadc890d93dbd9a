"""A diffusers DiTPipeline folder on a KL autoencoder, through every stage: import -> export (FP32 +
FP16) -> TensorRT-RTX ahead-of-time build -> generate -> parity, and its images against a sampling
loop written with diffusers' own transformer, scheduler and VAE decode from the same noise.

The pipeline is small and random (AutoencoderKL, a learned-sigma DiTTransformer2DModel whose
zero-initialised layers are re-randomised and whose per-block embedder copies are identical, as
published checkpoints have them) and its DDIMScheduler sets non-default flags (steps_offset=1,
set_alpha_to_one=False, "leading" spacing) that the samples only match if they are honoured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmgen_deploy.cli.app import main
from mmgen_deploy.io_utils import read_json
from mmgen_deploy.models.load import load_models
from mmgen_deploy.numerics import psnr, to_uint8
from mmgen_deploy.rundir import RunDir

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt is not installed (fp16 extra)")
pytest.importorskip("onnxruntime")

NUM_CLASSES = 5
LABELS = {"0": "tench, Tinca tinca", "1": "goldfish", "2": "great white shark", "3": "tiger shark", "4": "hammerhead"}
STEPS, CFG, SEED = 12, 4.0, 3
CLASSES = [0, 3, 4]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


@torch.no_grad()
def make_pipeline(root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=16).eval()
    dit = diffusers.DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
        attention_head_dim=16, num_embeds_ada_norm=NUM_CLASSES).eval()
    gen = torch.Generator().manual_seed(1)
    for name, param in dit.named_parameters():
        # The adaLN modulations and the final projection (zero in a fresh official DiT) get std 0.3:
        # noise predictions of a few units, so the images depend on the timesteps visited (with
        # diffusers' default init the DiT hardly moves the latent and any schedule gives the same images).
        if torch.count_nonzero(param) == 0 or any(k in name for k in ("norm1.linear", "proj_out_1", "proj_out_2")):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    shared = dit.transformer_blocks[0].norm1.emb.state_dict()
    for block in dit.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    vae.save_pretrained(root / "vae")
    dit.save_pretrained(root / "transformer")
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
        "id2label": LABELS, "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return {"vae": vae, "dit": dit, "scheduler_dir": root / "scheduler"}


@torch.no_grad()
def diffusers_loop(parts: dict[str, Any], noise: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """DiTPipeline.__call__'s loop (guidance on the noise channels, learned sigma split off) from
    given noise; the null label is the table's last row (1000 for ImageNet, NUM_CLASSES here)."""
    vae, dit = parts["vae"], parts["dit"]
    scheduler = diffusers.DDIMScheduler.from_pretrained(parts["scheduler_dir"])
    scheduler.set_timesteps(STEPS)
    latents = torch.from_numpy(noise)
    n, channels = len(class_ids), dit.config.in_channels
    labels = torch.tensor(class_ids + [NUM_CLASSES] * n)
    x = torch.cat([latents] * 2)
    for t in scheduler.timesteps:
        half = x[:n]
        x = torch.cat([half, half])
        out = dit(x, timestep=t.expand(2 * n), class_labels=labels).sample
        eps, rest = out[:, :channels], out[:, channels:]
        cond, uncond = eps.split(n)
        guided = uncond + CFG * (cond - uncond)
        model_output = torch.cat([torch.cat([guided, guided]), rest], dim=1)[:, :channels]
        x = scheduler.step(model_output, t, x).prev_sample
    images = vae.decode(x[:n] / vae.config.scaling_factor).sample
    return to_uint8(images.numpy())


def initial_noise(n: int) -> np.ndarray:
    """The sampler's per-image noise: default_rng([seed, i]) (mmgen_deploy.sampling.loop)."""
    noise = np.empty((n, 4, 8, 8), dtype=np.float32)
    for i in range(n):
        np.random.default_rng([SEED, i]).standard_normal(dtype=np.float32, out=noise[i])
    return noise


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict[str, Any]]:
    root = tmp_path_factory.mktemp("kl")
    parts = make_pipeline(root / "pipe")
    with pytest.raises(SystemExit) as info:
        main(["import", str(root / "pipe"), "--out", str(root / "run"), "--json", str(root / "import.json")])
    assert info.value.code in (0, None)
    with pytest.raises(SystemExit) as info:
        main(["export", str(root / "run"), "--json", str(root / "export.json")])
    assert info.value.code in (0, None)
    return RunDir(root / "run"), parts


def test_import_reads_the_pipeline_as_published(imported: tuple[RunDir, dict[str, Any]]) -> None:
    run, _ = imported
    config = run.load_config()
    assert config.first_stage_kind == "kl" and config.first_stage.scaling_factor == pytest.approx(0.18215)
    assert run.has_part("vae") and not run.has_part("vqvae")
    assert config.dit.learn_sigma and config.dit.timestep_freq_shift == 1.0
    assert config.class_names[0] == "tench, Tinca tinca" and len(config.class_names) == NUM_CLASSES
    d = config.diffusion
    assert (d.timestep_spacing, d.steps_offset, d.set_alpha_to_one, d.clip_sample) == ("leading", 1, False, False)


def test_export_has_the_kl_components_and_says_what_stayed_fp32(imported: tuple[RunDir, dict[str, Any]]) -> None:
    run, _ = imported
    manifest = read_json(run.onnx_dir / "manifest.json")
    assert manifest["first_stage"] == "kl" and manifest["components"] == ["encoder", "decoder", "denoiser"]
    for precision in ("fp32", "fp16"):
        assert sorted(manifest["files"][precision]) == ["decoder", "denoiser", "encoder"]
        assert all(entry["validation"]["passed"] for entry in manifest["files"][precision].values())
    assert not (run.onnx_dir / "fp16" / "quantizer.onnx").exists()
    decoder = manifest["files"]["fp16"]["decoder"]
    assert decoder["fp16_nodes"] > 0 and decoder["kept_fp32_nodes"]
    reasons = decoder["converter"]["fp32_reasons"]
    assert any("fp32_op_types" in r for r in reasons.values())  # the GroupNorms, by the spec
    for name, entry in manifest["files"]["fp16"].items():
        print(f"{name}: {entry['fp16_nodes']} FP16 nodes, {len(entry['kept_fp32_nodes'])} kept FP32:",
              sorted(set(entry["converter"]["fp32_reasons"].values())))


@pytest.mark.tensorrt
def test_tensorrt_rtx_builds_the_kl_set_ahead_of_time(imported: tuple[RunDir, dict[str, Any]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (dev extra)")
    run, _ = imported
    code, out = _cli(["build-engine", str(run.root), "--runtime", "tensorrt-rtx", "--opt-level", "0",
                      "--json", "-"], capsys)
    assert code == 0, out
    report, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
    assert set(report["components"]) == {"encoder", "decoder", "denoiser"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_generated_images_equal_the_diffusers_loop(imported: tuple[RunDir, dict[str, Any]], precision: str,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    run, parts = imported
    argv = ["generate", str(run.root), "--backend", "onnxruntime", "--precision", precision, "--steps", str(STEPS),
            "--cfg-scale", str(CFG), "--seed", str(SEED), "--n", "1", "--out", str(tmp_path / "samples")]
    for class_id in CLASSES:
        argv += ["--class", str(class_id)]
    code, out = _cli(argv, capsys)
    assert code == 0, out
    sidecar = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert [e["class_id"] for e in sidecar["images"]] == CLASSES
    ours = np.stack([np.asarray(Image.open(tmp_path / "samples" / e["file"])) for e in sidecar["images"]])
    reference = diffusers_loop(parts, initial_noise(len(CLASSES)), CLASSES)
    value = psnr(reference, ours)
    print(f"onnxruntime {precision} vs the diffusers loop: PSNR {value:.1f} dB")
    assert value >= 35.0


def test_the_scheduler_flags_matter(imported: tuple[RunDir, dict[str, Any]]) -> None:
    """Sampling with DiT's own respacing instead of the pipeline's DDIM flags gives other images:
    the agreement above is the flags' doing."""
    from mmgen_deploy.runtime.torch_runner import TorchRunner
    from mmgen_deploy.sampling import sample

    run, parts = imported
    config, kl, dit = load_models(run)
    respaced = config.replace(diffusion=config.diffusion.replace(timestep_spacing="respaced", steps_offset=0,
                                                                 set_alpha_to_one=True))
    kwargs: dict[str, Any] = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=len(CLASSES))
    reference = diffusers_loop(parts, initial_noise(len(CLASSES)), CLASSES)
    honoured = sample(TorchRunner(kl, dit, config=config), config, CLASSES, **kwargs)
    ignored = sample(TorchRunner(kl, dit, config=respaced), respaced, CLASSES, **kwargs)
    assert honoured.indices is None  # no quantizer in the decode chain
    kept, lost = psnr(reference, honoured.images), psnr(reference, ignored.images)
    print(f"torch fp32 vs the diffusers loop: {kept:.1f} dB with the pipeline's flags, {lost:.1f} dB with DiT's "
          "respacing")
    assert kept >= 60.0 and lost < 35.0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_parity_passes_without_index_checks(imported: tuple[RunDir, dict[str, Any]], precision: str,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = imported
    code, out = _cli(["parity", str(run.root), "--backend", "onnxruntime", "--precision", precision,
                      "--steps", "10", "--images", "4", "--json", str(tmp_path / "parity.json")], capsys)
    assert code == 0, out
    report = json.loads((tmp_path / "parity.json").read_text())
    checks = report["checks"]
    assert {c["group"] for c in checks} == {"encoder", "decoder", "denoiser", "end-to-end"}
    assert not any("agreement" in c["name"] for c in checks)
    assert all(c["passed"] for c in checks)
    worst: dict[str, float] = {}
    for c in checks:
        key = f"{c['group']}: {c['name'].split(' (')[0]}"
        worst[key] = max(worst.get(key, -np.inf), c["value"]) if "PSNR" not in key and "SSIM" not in key \
            else min(worst.get(key, np.inf), c["value"])
    print(f"parity onnxruntime {precision}:", {k: f"{v:.3g}" for k, v in worst.items()})


def test_train_dit_on_an_imported_kl_autoencoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mmgen train dit --data` trains the imported run's DiT architecture on the KL latents of the data;
    the label table follows the data (2 classes of a small image folder instead of the pipeline's 5)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    make_pipeline(tmp_path / "pipe")
    code, out = _cli(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run")], capsys)
    assert code == 0, out
    code, out = _cli(["train", "dit", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--data" in out  # an imported run has no training data of its own
    code, out = _cli(["train", "dit", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--steps", "4",
                      "--batch-size", "8", "--threads", "1"], capsys)
    assert code == 0, out
    run = RunDir(tmp_path / "run")
    config, _, _ = load_models(run)  # the trained DiT loads with its resized label table
    assert config.first_stage_kind == "kl" and config.dit.num_classes == 2 and config.class_names == ("cats", "dogs")
    assert config.dit.timestep_freq_shift == 1.0 and config.diffusion.steps_offset == 1  # architecture, schedule kept
    assert (tmp_path / "run" / "dit" / "imported.safetensors").is_file()
    # The latents it trained on are the KL encoder's scaled means of the images.
    cache = torch.load(run.checkpoints_dir / "dit_latents.pt", weights_only=True)
    assert tuple(cache["latents"].shape[1:]) == (4, 8, 8)


def test_id2label_synonyms_name_classes(imported: tuple[RunDir, dict[str, Any]]) -> None:
    from mmgen_deploy.errors import UsageError
    from mmgen_deploy.sampling.conditioning import resolve_class

    config = imported[0].load_config()
    assert resolve_class(config, "Tinca tinca") == resolve_class(config, "tench") == 0
    assert resolve_class(config, "hammerhead") == 4
    with pytest.raises(UsageError, match="unknown class"):
        resolve_class(config, "shark")
