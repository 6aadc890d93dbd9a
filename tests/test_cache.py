"""Step caching: the denoiser in parts (head, body, tail) on every backend, and the cache policies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from export_helpers import record_as_exported

from mmgen_deploy.config import DIT_CONDITIONINGS, preset, with_text
from mmgen_deploy.models import DiT, TextEncoder, VQModel, build_components
from mmgen_deploy.models.components import rerandomize_
from mmgen_deploy.numerics import tensor_diff
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.runtime.base import Runner
from mmgen_deploy.specs import DENOISER_PARTS, Tensors, component_names, component_specs, denoiser_split


def _compose(run: Runner, feeds: dict[str, np.ndarray], specs: dict) -> np.ndarray:
    """The whole denoiser's output computed as head -> body -> tail (no caching)."""
    head = {k: v.copy() for k, v in run.run("denoiser_head", feeds).items()}
    given = {**feeds, **head}
    given.update({k: v.copy() for k, v in
                  run.run("denoiser_body", {n: given[n] for n in specs["denoiser_body"].input_names}).items()})
    return run.run("denoiser_tail", {n: given[n] for n in specs["denoiser_tail"].input_names})[
        Tensors.MODEL_OUTPUT].copy()


@pytest.mark.parametrize("conditioning", ["class", *DIT_CONDITIONINGS[1:]])
def test_parts_compose_to_the_whole_denoiser_in_torch(conditioning: str) -> None:
    config = preset("tiny") if conditioning == "class" else with_text(preset("tiny"), conditioning=conditioning)
    torch.manual_seed(0)
    dit = rerandomize_(DiT(config.dit), seed=2).eval()
    text = TextEncoder(config.text).eval() if config.text is not None else None
    modules = build_components(VQModel(config.first_stage), dit, text, parts=True)
    specs = component_specs(config, parts=True)
    assert tuple(modules) == tuple(specs) == component_names(config, parts=True)
    feeds = specs["denoiser"].make_inputs(3, np.random.default_rng(0))

    def run(name: str, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = modules[name](*[torch.from_numpy(given[n]) for n in specs[name].input_names])
        outs = out if isinstance(out, tuple) else (out,)
        return {t.name: o.numpy() for t, o in zip(specs[name].outputs, outs, strict=True)}

    class Modules:
        def run(self, name: str, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return run(name, given)

    whole = run("denoiser", feeds)[Tensors.MODEL_OUTPUT]
    composed = _compose(Modules(), feeds, specs)  # type: ignore[arg-type]
    assert tensor_diff(whole, composed).rel_l2 < 1e-6
    assert np.abs(whole).max() > 0.1  # re-randomised: the comparison is not of zeros


def test_the_head_signal_is_what_the_first_body_block_feeds_its_attention() -> None:
    """The adaptive policy's `modulated_input` is the timestep-modulated input the body's first block
    computes for itself, captured here from inside the whole denoiser."""
    config = preset("tiny")
    torch.manual_seed(0)
    dit = rerandomize_(DiT(config.dit), seed=3).eval()
    modules = build_components(VQModel(config.first_stage), dit, parts=True)
    specs = component_specs(config, parts=True)
    feeds = specs["denoiser"].make_inputs(2, np.random.default_rng(1))
    seen: list[torch.Tensor] = []
    first = dit.blocks[denoiser_split(config.dit)["denoiser_body"].start]
    hook = first.attn.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        modules["denoiser"](*[torch.from_numpy(feeds[n]) for n in specs["denoiser"].input_names])
        hook.remove()
        head_inputs = [torch.from_numpy(feeds[n]) for n in specs["denoiser_head"].input_names]
        _, _, signal = modules["denoiser_head"](*head_inputs)
    assert len(seen) == 1 and signal.shape == seen[0].shape
    assert torch.allclose(signal, seen[0], atol=1e-6)
    assert signal.abs().max() > 0.1


def test_split_covers_every_block_once() -> None:
    for name in ("tiny", "B/2"):
        dit = preset(name).dit
        split = denoiser_split(dit)
        assert tuple(split) == DENOISER_PARTS
        assert [b for part in split.values() for b in part] == list(range(dit.depth))
        assert len(split["denoiser_body"]) >= 1


def test_parts_are_not_exported_by_default() -> None:
    config = preset("tiny")
    assert not set(DENOISER_PARTS) & set(component_names(config))
    assert not set(DENOISER_PARTS) & set(component_specs(config))



def test_every_block_is_in_the_body() -> None:
    """The split caches every block: a reused step runs only the embeddings and the final layer, and even
    a one-block DiT has parts."""
    for depth in (1, 4, 28):
        dit = dataclasses.replace(preset("tiny").dit, depth=depth)
        assert denoiser_split(dit)["denoiser_body"] == range(0, depth)


def test_a_dit_too_shallow_for_the_split_has_no_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a split that keeps a block out of the body, a one-block DiT leaves nothing for a policy to
    reuse, so the parts are left out (the export's cost count and models build every component a run
    may hold) and asking for them is refused in one line."""
    from mmgen_deploy import specs
    from mmgen_deploy.errors import UsageError
    from mmgen_deploy.export.budget import component_costs
    from mmgen_deploy.export.exporter import normalize_selection

    monkeypatch.setattr(specs, "CACHE_HEAD_BLOCKS", 1)
    config = preset("tiny")
    config = config.replace(dit=dataclasses.replace(config.dit, depth=1))
    assert not set(DENOISER_PARTS) & set(component_names(config, parts=True))
    assert not set(DENOISER_PARTS) & set(component_costs(config))
    with torch.device("meta"):
        vq, dit = VQModel(config.first_stage), DiT(config.dit)
    assert not set(DENOISER_PARTS) & set(build_components(vq, dit, parts=True))
    with pytest.raises(UsageError, match="too few blocks"):
        normalize_selection(["fp32"], ["denoiser_parts"], component_names(config, parts=True))
    from mmgen_deploy.runtime.torch_runner import TorchRunner
    from mmgen_deploy.sampling import sample

    torch.manual_seed(0)
    runner = TorchRunner(VQModel(config.first_stage).eval(), DiT(config.dit).eval(), config=config)
    with pytest.raises(UsageError, match="too few to split"):
        sample(runner, config, [0], steps=2, cache="every:2")

@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_exported_parts_compose_to_the_whole_denoiser(parts_run: RunDir, backend: str) -> None:
    from mmgen_deploy.runtime.select import runner_class

    if backend == "openvino":
        pytest.importorskip("openvino")
    specs = component_specs(parts_run.load_config(), parts=True)
    with runner_class(backend).from_run_dir(parts_run, "fp32") as runner:
        for batch in (1, 4):
            feeds = specs["denoiser"].make_inputs(batch, np.random.default_rng(batch))
            whole = runner.run("denoiser", feeds)[Tensors.MODEL_OUTPUT].copy()
            assert tensor_diff(whole, _compose(runner, feeds, specs)).rel_l2 < 1e-5


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_part_cut_at_another_split_is_refused_before_loading(parts_run: RunDir, tmp_path: Path,
                                                               backend: str) -> None:
    """A body whose manifest entry names other blocks (a split an older export cut) would compose into
    a wrong denoiser without a word: every backend refuses it in one line that says how to re-export."""
    import shutil

    from mmgen_deploy.errors import RunDirError
    from mmgen_deploy.io_utils import read_json, write_json
    from mmgen_deploy.runtime.select import runner_class

    if backend == "openvino":
        pytest.importorskip("openvino")
    copy = RunDir(shutil.copytree(parts_run.root, tmp_path / "run"))
    manifest = read_json(copy.onnx_manifest_path)
    assert manifest["files"]["fp32"]["denoiser_body"]["blocks"] == [0, copy.load_config().dit.depth]
    manifest["files"]["fp32"]["denoiser_body"]["blocks"] = [1, copy.load_config().dit.depth]
    write_json(copy.onnx_manifest_path, manifest)
    specs = component_specs(copy.load_config(), parts=True)
    feeds = specs["denoiser_body"].make_inputs(1, np.random.default_rng(0))
    with runner_class(backend).from_run_dir(copy, "fp32") as runner, \
            pytest.raises(RunDirError, match=r"runs DiT blocks 1-\d+, expected DiT blocks 0-\d+") as caught:
        runner.run("denoiser_body", feeds)
    assert "--components denoiser_parts" in str(caught.value.hint) and "\n" not in str(caught.value)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_graph_without_a_manifest_entry_is_checked_against_its_spec(parts_run: RunDir, tmp_path: Path,
                                                                       backend: str) -> None:
    """A hand-placed graph (no manifest entry to compare) is checked by its backend once loaded: the tail's
    graph where the head's belongs has other tensors, refused in one line."""
    import shutil

    from mmgen_deploy.errors import RunDirError
    from mmgen_deploy.io_utils import read_json, write_json
    from mmgen_deploy.runtime.select import runner_class

    if backend == "openvino":
        pytest.importorskip("openvino")
    copy = RunDir(shutil.copytree(parts_run.root, tmp_path / "run"))
    manifest = read_json(copy.onnx_manifest_path)
    del manifest["files"]["fp32"]["denoiser_head"]
    write_json(copy.onnx_manifest_path, manifest)
    shutil.copyfile(copy.onnx_path("fp32", "denoiser_tail"), copy.onnx_path("fp32", "denoiser_head"))
    specs = component_specs(copy.load_config(), parts=True)
    feeds = specs["denoiser_head"].make_inputs(1, np.random.default_rng(0))
    with runner_class(backend).from_run_dir(copy, "fp32") as runner, \
            pytest.raises(RunDirError, match=r"denoiser_head.onnx has inputs .*expected") as caught:
        runner.run("denoiser_head", feeds)
    assert "--components denoiser_parts" in str(caught.value.hint) and "\n" not in str(caught.value)


def test_the_head_and_tail_sessions_do_not_spin_between_calls(parts_run: RunDir) -> None:
    """The head and the tail run for milliseconds between the body's calls: their ONNX Runtime worker
    threads must sleep after a call instead of spin-waiting on the cores the body needs next."""
    from mmgen_deploy.runtime.ort_runner import OrtRunner

    specs = component_specs(parts_run.load_config(), parts=True)
    with OrtRunner.from_run_dir(parts_run, "fp32", threads=2) as runner:
        spinning = {}
        for name in ("denoiser", *DENOISER_PARTS):
            options = runner._session(specs[name]).session.get_session_options()
            try:
                spinning[name] = options.get_session_config_entry("session.intra_op.allow_spinning")
            except RuntimeError:  # not set: ONNX Runtime's default, spinning
                spinning[name] = "default"
    assert spinning == {"denoiser": "default", "denoiser_head": "0", "denoiser_body": "default",
                        "denoiser_tail": "0"}


def test_exporting_parts_leaves_the_whole_denoiser_byte_for_byte(parts_run: RunDir,
                                                                 exported_tiny_run: RunDir) -> None:
    """Same weights (the same seeds as `exported_tiny_run`): the same denoiser graph, with or without parts."""
    from mmgen_deploy.io_utils import read_json

    with_parts = read_json(parts_run.onnx_manifest_path)["files"]["fp32"]
    without = read_json(RunDir.of(exported_tiny_run).onnx_manifest_path)["files"]["fp32"]
    assert set(DENOISER_PARTS) <= set(with_parts) and not set(DENOISER_PARTS) & set(without)
    assert with_parts["denoiser"]["sha256"] == without["denoiser"]["sha256"]
    assert read_json(parts_run.onnx_manifest_path)["components"] == list(component_names(parts_run.load_config()))


# -- policies -------------------------------------------------------------------------------------

def _schedule(policy: str, steps: int, hidden: list[np.ndarray] | None = None) -> list[int]:
    from mmgen_deploy.sampling.cache import parse_cache_policy

    decider = parse_cache_policy(policy).decider(steps)
    frames = hidden or [np.ones((2, 4, 8), np.float32)] * steps
    return [i for i in range(steps) if decider.recompute(i, frames[i])]


def test_every_n_recomputes_every_nth_and_the_first_and_last_steps() -> None:
    assert _schedule("every:1", 5) == [0, 1, 2, 3, 4]
    assert _schedule("every:2", 6) == [0, 2, 4, 5]
    assert _schedule("every:3", 10) == [0, 3, 6, 9]
    assert _schedule("every:3", 11) == [0, 3, 6, 9, 10]
    assert _schedule("EVERY:4", 1) == [0]


def test_adaptive_recomputes_when_the_accumulated_change_reaches_the_threshold() -> None:
    base = np.ones((2, 4, 8), np.float32)
    # Relative L1 changes from the previous step: 0.1 at every step after the first.
    frames = [base * (1.1 ** i) for i in range(8)]
    assert _schedule("adaptive:0.25", 8, frames) == [0, 3, 6, 7]  # 0.1 + 0.1 + 0.1 >= 0.25
    assert _schedule("adaptive:0.05", 8, frames) == list(range(8))
    assert _schedule("adaptive:5", 8, frames) == [0, 7]
    assert _schedule("adaptive:0.25", 8, [base] * 8) == [0, 7]  # no change: only the first and the last


@pytest.mark.parametrize("text", ["sometimes", "every", "every:0", "every:1.5", "every:x", "adaptive:0",
                                  "adaptive:-1", "adaptive:nan", "none:2", "adaptive:"])
def test_bad_policies_are_refused_in_one_line(text: str) -> None:
    from mmgen_deploy.errors import UsageError
    from mmgen_deploy.sampling.cache import parse_cache_policy

    with pytest.raises(UsageError) as caught:
        parse_cache_policy(text)
    assert "\n" not in str(caught.value)


def test_policy_specs_round_trip() -> None:
    from mmgen_deploy.sampling.cache import parse_cache_policy

    for text in ("none", "every:2", "adaptive:0.1"):
        assert parse_cache_policy(parse_cache_policy(text).spec).spec == text == parse_cache_policy(text).spec
    assert not parse_cache_policy(None).enabled and parse_cache_policy("every:1").enabled


def test_cache_records_round_trip_and_uncounted_ones_carry_no_counts() -> None:
    from mmgen_deploy.sampling.cache import CacheStats

    counted = CacheStats(policy="every:2", blocks_evaluated=30, blocks_total=48, recompute_steps=[[0, 2, 3]])
    again = CacheStats.from_dict(counted.to_dict())
    assert (again.blocks_evaluated, again.blocks_total, again.recompute_steps) == (30, 48, [[0, 2, 3]])
    assert "30 / 48" in again.describe()
    remote = CacheStats(policy="every:2", counted=False)  # sampled by a server that kept its counts
    record = remote.to_dict()
    assert record["policy"] == "every:2" and record["block_evaluations"] is None
    assert record["saved_fraction"] is None
    assert not CacheStats.from_dict(record).counted and "server" in CacheStats.from_dict(record).describe()


# -- the cached sampling loop ---------------------------------------------------------------------

def test_cached_sampling_every_step_matches_the_whole_denoiser(parts_run: RunDir) -> None:
    from mmgen_deploy.runtime.ort_runner import OrtRunner
    from mmgen_deploy.sampling import sample

    config = parts_run.load_config()
    with OrtRunner(parts_run, "fp32") as runner:
        whole = sample(runner, config, [0, 5, 9], steps=6, seed=3, batch_size=2)
        parts = sample(runner, config, [0, 5, 9], steps=6, seed=3, batch_size=2, cache="every:1")
        cached = sample(runner, config, [0, 5, 9], steps=6, seed=3, batch_size=2, cache="every:2")
    assert tensor_diff(whole.latents, parts.latents).rel_l2 < 1e-5
    assert whole.cache.policy == "none" and whole.cache.saved_fraction == 0.0
    assert whole.cache.blocks_total == config.dit.depth * 3 * 6 == parts.cache.blocks_evaluated
    depth, body = config.dit.depth, len(denoiser_split(config.dit)["denoiser_body"])
    # every:2 over 6 steps computes the body at steps 0, 2, 4, 5: 2 of 6 steps skip it, for each image.
    assert cached.cache.recompute_steps == [[0, 2, 4, 5], [0, 2, 4, 5]]
    assert cached.cache.blocks_evaluated == 3 * (6 * depth - 2 * body)
    assert 0 < tensor_diff(whole.latents, cached.latents).rel_l2 < 0.5  # reuse changes the result, a little


def test_torch_and_onnxruntime_make_the_same_adaptive_decisions(parts_run: RunDir) -> None:
    from mmgen_deploy.runtime.ort_runner import OrtRunner
    from mmgen_deploy.runtime.torch_runner import TorchRunner
    from mmgen_deploy.sampling import sample

    config = parts_run.load_config()
    results = {}
    for cls in (TorchRunner, OrtRunner):
        with cls.from_run_dir(parts_run, "fp32") as runner:
            results[cls.backend] = sample(runner, config, [1, 2, 3, 4], steps=10, seed=0, batch_size=4,
                                          cache="adaptive:0.1")
    torch_run, ort_run = results["torch"].cache, results["onnxruntime"].cache
    assert torch_run.recompute_steps == ort_run.recompute_steps
    assert torch_run.recompute_steps == [[0, 1, 2, 4, 9]]  # the threshold decides something
    assert np.allclose(torch_run.signals[0][1:], ort_run.signals[0][1:], rtol=1e-4)


def test_a_run_without_parts_says_how_to_export_them(exported_tiny_run: RunDir) -> None:
    from mmgen_deploy.errors import NotAvailableError
    from mmgen_deploy.runtime.ort_runner import OrtRunner
    from mmgen_deploy.sampling import sample

    with OrtRunner(exported_tiny_run, "fp32") as runner, pytest.raises(NotAvailableError) as caught:
        sample(runner, RunDir.of(exported_tiny_run).load_config(), [0], steps=2, cache="every:2")
    assert "denoiser_parts" in (caught.value.hint or "")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from mmgen_deploy.cli.app import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def test_generate_with_a_cache_policy_reports_it(parts_run: RunDir, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mmgen_deploy.io_utils import read_json

    out = tmp_path / "samples"
    code, text = _cli(["generate", str(parts_run.root), "--backend", "onnxruntime", "--precision", "fp32",
                       "--steps", "4", "--n", "1", "--class", "0", "--cache", "every:2", "--out", str(out)], capsys)
    assert code == 0, text
    assert "every:2: " in text and "block evaluations" in text
    cache = read_json(out / "samples.json")["cache"]
    assert cache["policy"] == "every:2" and cache["recompute_steps"] == [[0, 2, 3]]
    assert cache["block_evaluations"] < cache["block_evaluations_total"]
    code, text = _cli(["generate", str(parts_run.root), "--cache", "sometimes"], capsys)
    assert code == 2 and "unknown cache policy" in text and "Traceback" not in text


# -- parity of a cached run -----------------------------------------------------------------------

def _parity(run: RunDir | Path, cache: str) -> Any:
    from mmgen_deploy.parity.compare import ParityOptions, run_parity

    options = ParityOptions(backend="onnxruntime", precision="fp32", batches=(2,), steps=4, num_images=2,
                            allow_untrained=True, cache=cache, components=("denoiser", "quantizer", "decoder"))
    return run_parity(run, options)


def test_parity_of_a_cached_run_passes_and_a_perturbed_body_fails(parts_run: RunDir, tmp_path: Path) -> None:
    import shutil

    import onnx
    from onnx import numpy_helper

    report = _parity(parts_run, "every:2")
    assert report.passed, [c for c in report.checks if not c.passed]
    groups = {c.group for c in report.checks}
    assert set(DENOISER_PARTS) <= groups
    assert any(c.name.startswith("steps recomputed differently") for c in report.checks)
    # Named by its settings, the cache policy last (RunDir.report_path).
    assert len(list(parts_run.reports_dir.glob("parity-onnxruntime-fp32-*-cache-every2.json"))) == 1

    copy = RunDir(shutil.copytree(parts_run.root, tmp_path / "perturbed"))
    body = copy.onnx_path("fp32", "denoiser_body")
    model = onnx.load(str(body))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    biggest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(biggest) * 1.5, biggest.name))
    onnx.save(model, str(body))
    record_as_exported(body)
    perturbed = _parity(copy, "every:2")
    assert not perturbed.passed and "denoiser_body" in {c.group for c in perturbed.checks if not c.passed}

    def latent_error(r: Any) -> float:
        return next(c.value for c in r.checks if c.name == "final latent rel_l2")

    assert latent_error(perturbed) > 100 * latent_error(report)  # the sampled images move too
    assert _parity(copy, "none").passed  # without caching the parts are not used


def test_images_with_different_policies_in_one_call_are_those_made_alone(parts_run: RunDir) -> None:
    """What a server's dynamic batch and `mmgen batch` do: the policy is part of an image's settings."""
    from mmgen_deploy.runtime.ort_runner import OrtRunner
    from mmgen_deploy.sampling.requests import ImageSpec, sample_specs

    config = parts_run.load_config()
    specs = [ImageSpec(seed=1, class_id=0, steps=4, cache="every:2"), ImageSpec(seed=2, class_id=1, steps=4),
             ImageSpec(seed=3, class_id=2, steps=4, cache="every:3")]
    with OrtRunner(parts_run, "fp32") as runner:
        together = sample_specs(runner, config, specs)
        alone = [sample_specs(runner, config, [spec]).images[0] for spec in specs]
    assert [r.cache.policy for r in together.results] == ["every:2", "none", "every:3"]
    for image, single in zip(together.images, alone, strict=True):
        assert np.array_equal(image, single)


def test_an_adaptive_policy_groups_images_by_request_when_requests_are_served_together(parts_run: RunDir) -> None:
    """The adaptive signal is taken over a batch, so a server batching two requests under the same adaptive
    policy samples each request's images apart (`request_ids`): each gets the recompute steps it gets alone,
    which here differ from those of the two sampled as one batch. Other policies still share a batch."""
    from mmgen_deploy.runtime.ort_runner import OrtRunner
    from mmgen_deploy.sampling.requests import ImageSpec, sample_specs

    config = parts_run.load_config()
    adaptive = [ImageSpec(seed=s, class_id=c, steps=12, cache="adaptive:0.8") for c, s in ((6, 24), (7, 25), (8, 26))]
    every = [ImageSpec(seed=s, class_id=c, steps=12, cache="every:2") for c, s in ((1, 1), (2, 2))]
    with OrtRunner(parts_run, "fp32", threads=1) as runner:
        served = sample_specs(runner, config, [*adaptive, *every], request_ids=[0, 0, 1, 0, 1])
        first_alone = sample_specs(runner, config, adaptive[:2])
        second_alone = sample_specs(runner, config, adaptive[2:])
        one_batch = sample_specs(runner, config, adaptive)
    steps = {(r.cache.policy, len(r.images)): r.cache.recompute_steps for r in served.results}
    assert list(steps) == [("adaptive:0.8", 2), ("adaptive:0.8", 1), ("every:2", 2)]
    assert steps["adaptive:0.8", 2] == first_alone.results[0].cache.recompute_steps
    assert steps["adaptive:0.8", 1] == second_alone.results[0].cache.recompute_steps
    assert second_alone.results[0].cache.recompute_steps != one_batch.results[0].cache.recompute_steps
    assert np.array_equal(served.images[:2], first_alone.images)
    assert np.array_equal(served.images[2:3], second_alone.images)


def test_batch_with_a_cache_policy(parts_run: RunDir, tmp_path: Path) -> None:
    from mmgen_deploy.batch import BatchSettings, run_batch
    from mmgen_deploy.io_utils import read_json

    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"class": 0, "n": 2, "seed": 5, "steps": 4}\n')
    settings = BatchSettings(backend="onnxruntime", precision="fp32", cache="every:2")
    report = run_batch(parts_run.root, requests, tmp_path / "out", settings)
    assert report.written == 2
    assert read_json(tmp_path / "out" / "batch.json")["settings"]["cache"] == "every:2"
