"""Text-to-image core: tokenizer, config, text encoder, text-conditioned DiT, run directory, sampling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmgen_deploy.config import DIT_CONDITIONINGS, ModelConfig, preset, with_text
from mmgen_deploy.errors import ConfigError, RunDirError, UsageError
from mmgen_deploy.models import DiT, TextEncoder, VQModel, build_components, rerandomize_
from mmgen_deploy.models.load import load_text_encoder
from mmgen_deploy.rundir import RunDir, save_run
from mmgen_deploy.runtime.torch_runner import TorchRunner
from mmgen_deploy.sampling import sample, text_conditioning
from mmgen_deploy.specs import component_specs
from mmgen_deploy.text import BOS, EOS, PAD, UNK, WordTokenizer

CAPTIONS = ["a small red circle on the left", "a large blue square at the top", "a small green triangle in the center"]
TEXT_MODES = [c for c in DIT_CONDITIONINGS if c != "class"]


def test_tokenizer_is_deterministic_and_handles_unknown_and_long_prompts() -> None:
    tok = WordTokenizer.build(CAPTIONS, max_length=6)
    assert WordTokenizer.build(list(reversed(CAPTIONS)), max_length=6).words == tok.words
    enc = tok.encode(["A small RED circle!", "", "a zebra", "a small red circle on the left"])
    ids = enc.input_ids
    assert ids.dtype == np.int32 and ids.shape == (4, 6)
    assert tok.decode(ids[0]) == "a small red circle"
    assert list(ids[1]) == [BOS, EOS, PAD, PAD, PAD, PAD]  # the empty prompt: the unconditional input
    assert list(ids[2][:4]) == [BOS, tok.encode(["a"]).input_ids[0, 1], UNK, EOS]
    assert enc.unknown_words == ("zebra",)
    assert enc.truncated == (3,) and ids[3, -1] == EOS and tok.decode(ids[3]) == "a small red circle"


def test_tokenizer_file_round_trip_and_damage(tmp_path) -> None:
    tok = WordTokenizer.build(CAPTIONS)
    tok.save(tmp_path / "tokenizer.json")
    again = WordTokenizer.load(tmp_path / "tokenizer.json")
    assert again.words == tok.words and again.max_length == tok.max_length
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(RunDirError, match="not an mmgen word tokenizer"):
        WordTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(RunDirError, match="missing tokenizer"):
        WordTokenizer.load(tmp_path / "absent.json")


def test_text_config_round_trips_and_is_cross_checked() -> None:
    cfg = with_text(preset("tiny"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="text_dim"):
        cfg.replace(dit=cfg.dit.replace(text_dim=64))
    with pytest.raises(ConfigError, match="needs a text encoder"):
        ModelConfig(first_stage=cfg.first_stage, dit=cfg.dit).validate()
    with pytest.raises(ConfigError, match="conditioning"):
        cfg.dit.replace(conditioning="telepathy")


@pytest.mark.parametrize("mode", TEXT_MODES)
def test_text_components_match_their_specs(mode: str) -> None:
    cfg = with_text(preset("tiny"), conditioning=mode)
    comps = build_components(VQModel(cfg.first_stage), rerandomize_(DiT(cfg.dit)), rerandomize_(TextEncoder(cfg.text)))
    specs = component_specs(cfg)
    assert set(specs) == set(comps) == {"encoder", "quantizer", "decoder", "denoiser", "text_encoder"}
    rng = np.random.default_rng(0)
    for name in ("text_encoder", "denoiser"):
        spec = specs[name]
        feeds = spec.make_inputs(3, rng)
        with torch.no_grad():
            out = comps[name](*[torch.from_numpy(feeds[n]) for n in spec.input_names])
        outs = out if isinstance(out, tuple) else (out,)
        assert [tuple(o.shape) for o in outs] == [t.concrete_shape(3) for t in spec.outputs]
        assert all(torch.isfinite(o).all() for o in outs)


def test_text_encoder_ignores_padding_and_the_dit_uses_the_prompt() -> None:
    cfg = with_text(preset("tiny"), conditioning="pooled+cross_attention")
    encoder = rerandomize_(TextEncoder(cfg.text)).eval()
    ids = torch.tensor([[BOS, 5, 6, EOS] + [PAD] * 12])
    with torch.no_grad():
        emb, mask, pooled = encoder(ids)
        assert mask.tolist()[0] == [1.0] * 4 + [0.0] * 12
        # The pooled value comes from the real tokens only: the mean of the 4 first rows.
        torch.testing.assert_close(pooled[0], emb[0, :4].mean(0))
        # What sits at the padding positions (the [PAD] embedding, their position embeddings) must
        # not reach the real tokens' embeddings: change it, and only the padding rows move.
        other = copy.deepcopy(encoder)
        gen = torch.Generator().manual_seed(1)
        other.token_embedding.weight[PAD] = torch.randn(cfg.text.hidden_size, generator=gen)
        other.position_embedding[0, 4:] = torch.randn(12, cfg.text.hidden_size, generator=gen)
        emb_other, mask_other, pooled_other = other(ids)
        assert torch.equal(mask_other, mask)
        assert (emb_other[0, 4:] - emb[0, 4:]).abs().min() > 0  # the change reached every padding row
        torch.testing.assert_close(emb_other[0, :4], emb[0, :4], rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled_other, pooled, rtol=0, atol=1e-6)
        dit = rerandomize_(DiT(cfg.dit)).eval()
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
        other_ids = ids.clone()
        other_ids[0, 1] = 7
        emb2, mask2, pooled2 = encoder(other_ids)
        a = dit(x, t, text=emb, text_mask=mask, text_pooled=pooled)
        b = dit(x, t, text=emb2, text_mask=mask2, text_pooled=pooled2)
    assert (a - b).abs().max() > 1e-4  # a different word changes the prediction


def test_text_run_directory_round_trip(tmp_path) -> None:
    cfg = with_text(preset("tiny"))
    vq, dit, text = VQModel(cfg.first_stage), rerandomize_(DiT(cfg.dit)), rerandomize_(TextEncoder(cfg.text))
    tok = WordTokenizer.build(CAPTIONS, max_length=cfg.text.max_length)
    with pytest.raises(ValueError, match="text encoder and tokenizer"):
        save_run(tmp_path / "bad", cfg, vq, dit)
    run = save_run(tmp_path / "run", cfg, vq, dit, text_encoder=text, tokenizer=tok)
    assert run.load_config() == cfg
    loaded = load_text_encoder(run)
    for key, value in text.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert run.load_tokenizer().words == tok.words
    digest = run.weights_sha256()
    tok2 = WordTokenizer.build([*CAPTIONS, "a cyan square"], max_length=cfg.text.max_length)
    run.save_tokenizer(tok2)
    assert run.weights_sha256() != digest  # artifacts made with the old vocabulary become stale
    (run.root / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(RunDirError, match="missing weight file"):
        load_text_encoder(RunDir(run.root))


class CountingRunner:
    """A real TorchRunner that also counts component calls (not a stand-in for any backend)."""

    def __init__(self, runner: TorchRunner) -> None:
        self.inner, self.calls = runner, {}
        self.backend, self.precision, self.device = runner.backend, runner.precision, runner.device

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls[component] = self.calls.get(component, 0) + 1
        return self.inner.run(component, feeds)

    def close(self) -> None:
        self.inner.close()


def test_prompts_are_encoded_once_and_images_do_not_depend_on_batching() -> None:
    cfg = with_text(preset("tiny"), conditioning="pooled+cross_attention")
    tok = WordTokenizer.build(CAPTIONS, max_length=cfg.text.max_length)
    runner = CountingRunner(TorchRunner(VQModel(cfg.first_stage), rerandomize_(DiT(cfg.dit)), config=cfg,
                                        text_encoder=rerandomize_(TextEncoder(cfg.text))))
    prompts = ["a red circle", "a blue square", "a red circle"]
    cond = text_conditioning(runner, cfg, tok, prompts)
    assert runner.calls == {"text_encoder": 1}  # 2 distinct prompts + "" in one batch
    result = sample(runner, cfg, cond, steps=3, batch_size=2, seed=1)
    assert runner.calls["text_encoder"] == 1 and runner.calls["denoiser"] == 6  # 2 batches x 3 steps
    assert result.prompts == prompts and result.images.shape == (3, 32, 32, 3)
    alone = sample(runner, cfg, text_conditioning(runner, cfg, tok, prompts), steps=3, batch_size=3, seed=1)
    # As tight as the class version (rtol 1e-4): only float summation order may differ between batch sizes.
    np.testing.assert_allclose(alone.latents, result.latents, rtol=1e-4, atol=1e-4)
    # Guidance's unconditional half is the empty prompt: cfg 0 gives the "" images.
    uncond = sample(runner, cfg, text_conditioning(runner, cfg, tok, prompts), steps=3, cfg_scale=0.0, seed=1)
    empty = sample(runner, cfg, text_conditioning(runner, cfg, tok, ["", "", ""]), steps=3, cfg_scale=1.0, seed=1)
    np.testing.assert_allclose(uncond.latents, empty.latents, rtol=1e-4, atol=1e-4)


def test_prompts_and_class_ids_are_refused_by_the_wrong_model() -> None:
    cfg_text = with_text(preset("tiny"))
    tok = WordTokenizer.build(CAPTIONS)
    text_runner = TorchRunner(VQModel(cfg_text.first_stage), DiT(cfg_text.dit), config=cfg_text,
                              text_encoder=TextEncoder(cfg_text.text))
    with pytest.raises(UsageError, match="conditioned on text"):
        sample(text_runner, cfg_text, [0, 1], steps=2)
    cfg = preset("tiny")
    runner = TorchRunner(VQModel(cfg.first_stage), DiT(cfg.dit), config=cfg)
    with pytest.raises(UsageError, match="class-conditioned"):
        text_conditioning(runner, cfg, tok, ["a red circle"])
