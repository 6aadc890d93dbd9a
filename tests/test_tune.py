"""`mmgen tune`: the front, the recipe's staleness checks, and a tiny end-to-end tune (real runners)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mmgen_deploy.cli.app import main
from mmgen_deploy.errors import RunDirError, UsageError
from mmgen_deploy.rundir import RunDir
from mmgen_deploy.tuning.front import Point, dominates, fastest_within, pareto_front
from mmgen_deploy.tuning.recipe import load_recipe
from mmgen_deploy.tuning.search import CONFIDENCE, TuneOptions, rung_sizes
from mmgen_deploy.tuning.tune import tune_run


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


# -- the front -------------------------------------------------------------------------------

def test_dominance_needs_no_worse_on_both_and_better_on_one() -> None:
    fast_good, slow_good, fast_bad = Point(90, 10), Point(90, 20), Point(80, 10)
    assert dominates(fast_good, slow_good) and dominates(fast_good, fast_bad)
    assert not dominates(slow_good, fast_bad) and not dominates(fast_bad, slow_good)  # a trade-off
    assert not dominates(fast_good, Point(90, 10))  # equal points do not dominate each other


def test_the_front_keeps_the_trade_offs_fastest_first() -> None:
    points = [Point(93, 100), Point(92, 40), Point(91, 50), Point(85, 10), Point(85, 12), Point(60, 10),
              Point(92, 40)]
    front = pareto_front(points)
    assert [(p.quality, p.ms_per_image) for p in front] == [(85, 10), (92, 40), (92, 40), (93, 100)]
    assert fastest_within(points, 93, 2) == Point(92, 40)
    assert fastest_within(points, 93, 0) == Point(93, 100)
    assert fastest_within(points, 99, 1) is None


def test_rungs_grow_threefold_in_whole_units() -> None:
    assert rung_sizes(360, 18) == [54, 126, 360]
    assert rung_sizes(16, 1) == [2, 6, 16]
    assert rung_sizes(18, 18) == [18]


# -- a tiny end-to-end tune -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(exported_tiny_run, tmp_path_factory):
    """A copy of the tiny random-weight run (no judge: fidelity), tuned on a few configurations."""
    from mmgen_deploy.tuning.search import Measurement

    root = tmp_path_factory.mktemp("tune") / "run"
    shutil.copytree(exported_tiny_run.root, root)
    said: list[str] = []
    options = TuneOptions(samples=4, budget_seconds=120, max_quality_drop=5.0, backends=("torch", "onnxruntime"),
                          precisions=("fp32",), batch_sizes=(4,), threads=1, samplers=("ddim",), steps=(50, 10, 4),
                          caches=("none",))
    result = tune_run(root, options, said.append)
    assert isinstance(result.chosen, Measurement)
    return RunDir(root), result, said


def test_a_tiny_tune_measures_fidelity_and_writes_report_plot_and_recipe(tuned) -> None:
    run, tuned_run, said = tuned
    result = tuned_run.result
    assert result.measure.kind == "fidelity" and "SSIM" in result.measure.description
    assert any("reference images" in line for line in said) and any("images 1-" in line for line in said)
    # PyTorch FP32 and ONNX Runtime FP32 at the reference settings agree with the reference images.
    assert result.reference.candidate.engine.precision == "fp32" and result.reference.quality > 99.9
    # The reference and the default configuration are measured on every rung, whatever dominates them.
    assert result.reference.images == result.default.images == result.rungs[-1] == 4
    front = result.front()
    assert front and all(not any(other.quality > m.quality and other.ms_per_image < m.ms_per_image
                                 for other in front) for m in front)
    chosen = tuned_run.chosen
    drop, stderr = result.drop(chosen)
    assert chosen is result.reference or drop + CONFIDENCE * stderr <= 5.0
    assert chosen.images == 4
    assert chosen.ms_per_image <= result.reference.ms_per_image
    report = json.loads(tuned_run.report_path.read_text())
    assert report["measure"]["kind"] == "fidelity" and report["chosen"]["label"] == chosen.candidate.label()
    assert {c["status"] for c in report["configurations"]} <= {"measured", "pruned", "skipped", "cut", "failed",
                                                               "budget"}
    assert all("psnr_db" in c for c in report["configurations"] if c["images"])
    with Image.open(tuned_run.plot_path) as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    recipe = json.loads(run.recipe_path.read_text())
    assert recipe["chosen"]["config"] == chosen.candidate.to_dict()
    assert recipe["machine"]["fingerprint"] and recipe["artifacts"]["weights_sha256"] == run.weights_sha256()
    assert load_recipe(run).candidate == chosen.candidate
    # The reference images are kept in the run and reused.
    assert list(run.checkpoints_dir.glob("tune-reference-*.npz"))


def test_the_search_closes_runners_as_soon_as_nothing_left_can_use_them(exported_tiny_run, tmp_path,
                                                                         monkeypatch) -> None:
    """Each measurement records the runners open as it starts. Once the engines are chosen, and on the last
    rung after each measurement, a runner stays open only while a later measurement uses it."""
    from mmgen_deploy.tuning import search as search_module
    from mmgen_deploy.tuning.search import runner_key

    root = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, root)
    measured: list[tuple[object, str, frozenset, frozenset]] = []  # candidate, what, runners open, warm runners
    measure_to = search_module._Search.measure_to

    def recording(self, candidate, images, rung, what):
        open_before = frozenset(self.runners.open)
        warm_before = frozenset((key[0], key[1].backend, key[1].precision, key[1].device) for key in self.warm)
        m = measure_to(self, candidate, images, rung, what)
        if m.images == images and m.rung == rung and (not measured or measured[-1][0] != candidate
                                                      or measured[-1][1] != what):
            measured.append((candidate, what, open_before, warm_before))
        return m

    monkeypatch.setattr(search_module._Search, "measure_to", recording)
    options = TuneOptions(samples=4, budget_seconds=600, max_quality_drop=5.0, backends=("torch", "onnxruntime"),
                          precisions=("fp32",), batch_sizes=(4,), threads=1, samplers=("ddim",), steps=(50, 4),
                          caches=("none",))
    result = tune_run(root, options).result
    assert result.rungs == [1, 2, 4] and not result.budget_exhausted
    used_later = [{runner_key(c) for c, *_ in measured[i:]} for i in range(len(measured))]
    assert len(used_later[0]) >= 2  # PyTorch and ONNX Runtime both ran
    for i, (_candidate, what, open_before, warm_before) in enumerate(measured):
        assert warm_before <= open_before  # warm call shapes are forgotten with their runner
        if what.startswith(f"rung {len(result.rungs)}/") or i == next(
                j for j, (_c, w, *_) in enumerate(measured) if w.startswith("rung 1 ")):
            assert open_before <= used_later[i], (what, open_before, used_later[i])


def test_generate_takes_its_settings_from_the_recipe_and_refuses_overrides(tuned, tmp_path, capsys) -> None:
    run, tuned_run, _ = tuned
    chosen = tuned_run.chosen.candidate
    out = tmp_path / "recipe-samples"
    code, _, stderr = _cli(["generate", str(run.root), "--recipe", "-c", "1", "--n", "2", "--out", str(out)], capsys)
    assert code == 0, stderr
    sidecar = json.loads((out / "samples.json").read_text())
    assert sidecar["settings"]["steps"] == chosen.settings.steps
    assert sidecar["backend"]["backend"] == chosen.engine.backend
    code, _, stderr = _cli(["generate", str(run.root), "--recipe", "--steps", "3", "--out", str(tmp_path / "x")],
                           capsys)
    assert code != 0 and "--recipe sets --steps" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x").exists()


def test_bench_measures_the_recipe_and_refuses_overrides(tuned, tmp_path, capsys) -> None:
    run, tuned_run, _ = tuned
    chosen = tuned_run.chosen.candidate
    report = tmp_path / "bench.json"
    code, _, stderr = _cli(["bench", str(run.root), "--recipe", "--runs", "1", "--warmup", "0", "-c", "decoder",
                            "--json", str(report)], capsys)
    assert code == 0, stderr
    result = json.loads(report.read_text())
    assert [(b["backend"], b["precision"]) for b in result["backends"]] == [(chosen.engine.backend,
                                                                             chosen.engine.precision)]
    assert result["batches"] == [chosen.engine.batch_size]
    assert (result["steps"], result["sampler"], result["cache"]) == (chosen.settings.steps, chosen.settings.sampler,
                                                                     chosen.settings.cache)
    code, _, stderr = _cli(["bench", str(run.root), "--recipe", "--backend", "onnxruntime"], capsys)
    assert code != 0 and "--recipe sets --backend" in stderr and "Traceback" not in stderr


def test_triton_repo_serves_the_recipe_and_refuses_overrides(tuned, tmp_path, capsys) -> None:
    run, tuned_run, _ = tuned
    chosen = tuned_run.chosen
    repo = tmp_path / "repo"
    code, _, stderr = _cli(["triton-repo", str(run.root), "--recipe", "--out", str(repo)], capsys)
    assert code == 0, stderr
    pbtxt = (repo / "mmgen_generate" / "config.pbtxt").read_text()
    engine, settings = chosen.candidate.engine, chosen.candidate.settings
    for key, value in (("backend", engine.backend), ("precision", engine.precision),
                       ("default_sampler", settings.sampler), ("default_steps", str(settings.steps)),
                       ("default_cfg_scale", repr(float(settings.cfg_scale))), ("default_cache", settings.cache),
                       ("threads", str(load_recipe(run).threads))):
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in pbtxt, key
    code, _, stderr = _cli(["triton-repo", str(run.root), "--recipe", "--steps", "5", "--out",
                            str(tmp_path / "other")], capsys)
    assert code != 0 and "--recipe sets --steps" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "other").exists()


def test_a_recipe_from_another_machine_is_refused(tuned, tmp_path) -> None:
    run, _, _ = tuned
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    recipe = json.loads(copy.recipe_path.read_text())
    recipe["machine"]["fingerprint"] = "0" * 64
    recipe["machine"]["cpu"] = "Some Other CPU"
    copy.recipe_path.write_text(json.dumps(recipe))
    with pytest.raises(RunDirError, match=r"measured on another machine \(Some Other CPU") as info:
        load_recipe(copy)
    assert "mmgen tune" in str(info.value.hint) and "\n" not in info.value.message


def test_a_recipe_for_changed_weights_is_refused(tuned, tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    run, _, _ = tuned
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    assert load_recipe(copy)  # a copy of the same artifacts on the same machine is valid
    state = copy.load_state("dit")
    name = next(iter(state))
    state[name] = state[name] + 0.01
    save_file(state, str(copy.weights_path("dit")), metadata={"mmgen": "mmgen-run/dit"})
    with pytest.raises(RunDirError, match="stale: weights_sha256"):
        load_recipe(copy)
    code, _, stderr = _cli(["generate", str(copy.root), "--recipe", "--n", "1", "-c", "0"], capsys)
    assert code != 0 and "stale" in stderr and "mmgen tune" in stderr and "Traceback" not in stderr


def test_no_recipe_is_refused_in_one_line(exported_tiny_run, capsys) -> None:
    with pytest.raises(RunDirError, match="has no recipe"):
        load_recipe(exported_tiny_run)


def test_an_interrupted_tune_leaves_no_recipe(exported_tiny_run, tmp_path) -> None:
    root = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, root)

    def interrupt(text: str) -> None:
        if "images 1-" in text:
            raise KeyboardInterrupt

    options = TuneOptions(samples=2, max_quality_drop=1.0, backends=("onnxruntime",), precisions=("fp32",),
                          batch_sizes=(2,), threads=1, steps=(50, 4), samplers=("ddim",), caches=("none",))
    with pytest.raises(KeyboardInterrupt):
        tune_run(root, options, interrupt)
    assert not RunDir(root).recipe_path.exists()
    assert not [p for p in root.iterdir() if "recipe" in p.name]


def test_a_student_must_name_the_run_as_its_teacher(exported_tiny_run, tmp_path) -> None:
    from mmgen_deploy.tuning.space import student_teacher_check

    with pytest.raises(UsageError, match="not a distilled student"):
        student_teacher_check(exported_tiny_run, exported_tiny_run)


def test_shapes_runs_are_judged_and_others_compared_with_the_reference(exported_tiny_run, tmp_path) -> None:
    from mmgen_deploy.tuning.quality import ClassJudge, has_judge

    root = tmp_path / "run"
    shutil.copytree(exported_tiny_run.root, root)
    run = RunDir(root)
    assert not has_judge(run)
    run.update_meta(data={"name": "shapes", "image_size": 32, "seed": 0, "num_train": 10, "num_val": 4})
    assert has_judge(run)
    judge = ClassJudge(run, 0)
    assert judge.conditions(17, 20) == ([17, 0, 1], []) and judge.unit == 18
    # An all-hit measurement on few images is not taken as certain.
    assert judge.noise([100.0] * 4) > 10
    assert np.isfinite(judge.noise([0.0, 100.0]))
