"""The component specs: one consistent description per component."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgen_deploy.config import preset
from mmgen_deploy.models import build_components
from mmgen_deploy.specs import BATCH, component_specs, scope_regex


@pytest.mark.parametrize("name", ["tiny", "S/2"])
def test_specs_describe_the_modules_they_belong_to(name: str) -> None:
    config = preset(name)
    specs = component_specs(config)
    assert list(specs) == ["encoder", "quantizer", "decoder", "denoiser"]
    rng = np.random.default_rng(0)
    for spec in specs.values():
        for tensor in (*spec.inputs, *spec.outputs):
            assert tensor.shape[0] == BATCH and BATCH not in tensor.shape[1:]  # only the batch axis is dynamic
            assert tensor.dtype in ("float32", "int32")
        inputs = spec.make_inputs(3, rng)
        assert list(inputs) == spec.input_names
        for tensor in spec.inputs:
            assert inputs[tensor.name].shape == tensor.concrete_shape(3)
            assert inputs[tensor.name].dtype == np.dtype(tensor.dtype)
    assert specs["denoiser"].engine_profile.max == 2 * specs["denoiser"].profile.max
    assert specs["quantizer"].keep_fp32 and not specs["decoder"].keep_fp32
    assert specs["denoiser"].tolerance("fp16", "model_output").rel_l2 == 1e-2
    assert specs["denoiser"].tolerance("fp32", "model_output").rel_l2 == 1e-5


def test_spec_shapes_match_pytorch_outputs(random_models) -> None:
    config, vq, dit = random_models
    specs, modules = component_specs(config), build_components(vq, dit)
    rng = np.random.default_rng(1)
    for name, spec in specs.items():
        inputs = spec.make_inputs(2, rng)
        with torch.no_grad():
            out = modules[name](*[torch.from_numpy(inputs[n]) for n in spec.input_names])
        outs = out if isinstance(out, tuple) else (out,)
        for tensor, value in zip(spec.outputs, outs, strict=True):
            assert tuple(value.shape) == tensor.concrete_shape(2)
            assert str(value.dtype).replace("torch.", "") == tensor.dtype
    # Denoiser dummy inputs cover the whole timestep range and the null label.
    big = specs["denoiser"].make_inputs(4096, rng)
    assert big["t"].max() > 900 and big["class_ids"].max() == config.dit.num_classes


def test_fp32_scopes_become_node_name_regexes() -> None:
    assert scope_regex("dit.t_embedder") == "^/dit/t_embedder/"


def test_component_and_precision_lists_come_from_the_specs_module() -> None:
    from mmgen_deploy.config import audio_layout, with_audio, with_text
    from mmgen_deploy.models import DiT, TextEncoder, VQModel
    from mmgen_deploy.specs import (
        COMPONENTS,
        PIPELINE_TOLERANCES,
        PRECISIONS,
        RUN_PRECISIONS,
        SAMPLING_COMPONENTS,
        component_names,
        sampling_components,
    )

    class_cfg, text_cfg = preset("tiny"), with_text(preset("tiny"))
    audio_text_cfg = with_audio(text_cfg, audio_layout(32))  # a model with every kind of component
    assert component_names(audio_text_cfg) == COMPONENTS and set(SAMPLING_COMPONENTS) < set(COMPONENTS)
    for cfg in (class_cfg, text_cfg, audio_text_cfg):
        specs = component_specs(cfg)
        assert tuple(specs) == component_names(cfg)  # in pipeline order
        assert set(sampling_components(cfg)) <= set(specs)
        for spec in specs.values():
            assert set(spec.tolerances) == set(RUN_PRECISIONS)
        text = TextEncoder(cfg.text) if cfg.text is not None else None
        built = build_components(VQModel(cfg.first_stage), DiT(cfg.dit), text, audio=cfg.audio)
        assert tuple(built) == component_names(cfg)
    assert "vocoder" not in component_names(text_cfg) and "vocoder" in sampling_components(audio_text_cfg)
    assert "text_encoder" not in component_names(class_cfg) and "text_encoder" in sampling_components(text_cfg)
    assert set(PIPELINE_TOLERANCES) == set(RUN_PRECISIONS) and set(PRECISIONS) < set(RUN_PRECISIONS)
    # The denoiser's engine profile covers guidance's doubled batch, the one the sampling loop sends.
    denoiser = component_specs(class_cfg)["denoiser"]
    assert denoiser.engine_profile.max == 2 * denoiser.profile.max
