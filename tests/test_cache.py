"""Step caching: the denoiser in parts (head, body, tail) on every backend, and the cache policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


@pytest.fixture(scope="module")
def parts_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """A re-randomised tiny class run with its FP32 sampling set and the denoiser's parts."""
    from mmgen_deploy.export import export_run
    from mmgen_deploy.rundir import save_run

    config = preset("tiny").replace(class_names=tuple(f"shape {i}" for i in range(18)))
    torch.manual_seed(0)
    vq, dit = VQModel(config.first_stage), DiT(config.dit)
    rerandomize_(vq, seed=1)
    rerandomize_(dit, seed=2)
    run = save_run(tmp_path_factory.mktemp("cache") / "run", config, vq.eval(), dit.eval())
    export_run(run, precisions=("fp32",), components=("denoiser", "quantizer", "decoder"))
    export_run(run, precisions=("fp32",), components=("denoiser_parts",))
    return run


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


def test_exporting_parts_leaves_the_whole_denoiser_byte_for_byte(parts_run: RunDir,
                                                                 exported_tiny_run: RunDir) -> None:
    """Same weights (the same seeds as `exported_tiny_run`): the same denoiser graph, with or without parts."""
    from mmgen_deploy.io_utils import read_json

    with_parts = read_json(parts_run.onnx_manifest_path)["files"]["fp32"]
    without = read_json(RunDir.of(exported_tiny_run).onnx_manifest_path)["files"]["fp32"]
    assert set(DENOISER_PARTS) <= set(with_parts) and not set(DENOISER_PARTS) & set(without)
    assert with_parts["denoiser"]["sha256"] == without["denoiser"]["sha256"]
    assert read_json(parts_run.onnx_manifest_path)["components"] == list(component_names(parts_run.load_config()))
