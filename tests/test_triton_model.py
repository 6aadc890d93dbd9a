"""The Triton model `mmgen_generate` (serve/triton_model.py) in this process: request validation,
good and bad requests in one dynamic batch, and the per-request fallback when a merged batch fails.

Inside `tritonserver` the model gets its tensors from the Python backend's C module. Here a small
stand-in (`_PbUtils`) carries the same data (named numpy tensors, responses, errors) so `execute` can
be handed any mix of requests directly; the runner under it is the real ONNX Runtime one. What only a
server shows (dynamic batching, the stub, the HTTP client) is tested against the real server in
test_serve.py and test_serve_text.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmgen_deploy.rundir import RunDir

MODEL_FILE = Path(__file__).resolve().parents[1] / "mmgen_deploy" / "serve" / "triton_model.py"
STEPS = 2


class _Tensor:
    def __init__(self, name: str, array: Any) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Error:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: _Error | None = None) -> None:
        self.tensors = {t.name(): t for t in output_tensors or []}
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> _Error | None:
        return self._error


class _Request:
    """What Triton hands `execute`: named inputs of shape [rows, 1] (declared dims [1], batched)."""

    def __init__(self, **inputs: Any) -> None:
        self.inputs = {name: _Tensor(name, value) for name, value in inputs.items()}


def _pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor  # type: ignore[attr-defined]
    module.TritonError = _Error  # type: ignore[attr-defined]
    module.InferenceResponse = _Response  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)  # type: ignore[attr-defined]
    module.get_output_tensor_by_name = lambda response, name: response.tensors.get(name)  # type: ignore[attr-defined]
    module.Logger = types.SimpleNamespace(log_info=lambda message: None)  # type: ignore[attr-defined]
    return module


def _load_model(run: RunDir, monkeypatch: pytest.MonkeyPatch, **params: str) -> Any:
    """`TritonPythonModel` initialised on `run` (ONNX Runtime fp32, 1 thread) as the server would."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
    spec = importlib.util.spec_from_file_location("mmgen_triton_model_under_test", MODEL_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parameters = {"run_dir": str(run.root), "backend": "onnxruntime", "precision": "fp32", "threads": "1",
                  "samplers": "ddim,ddpm", **params}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"max_batch_size": 8, "parameters": {
        k: {"string_value": v} for k, v in parameters.items()}}), "model_repository": str(run.root),
        "model_version": "1"})
    return model


def _rows(values: list[Any], dtype: Any) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def _class_request(class_ids: list[int], seeds: list[int], **extra: Any) -> _Request:
    return _Request(CLASS_ID=_rows(class_ids, np.int32), SEED=_rows(seeds, np.int64),
                    STEPS=_rows([STEPS] * len(class_ids), np.int32), **extra)


def _reference(run: RunDir, rows: list[tuple[int, int]]) -> np.ndarray:
    """The images of (class id, seed) rows sampled together by the library, as `mmgen generate` does."""
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling.requests import ImageSpec, sample_specs

    runner, _ = open_runner(run.root, "onnxruntime", "fp32", threads=1)
    try:
        specs = [ImageSpec(seed=seed, class_id=class_id, steps=STEPS) for class_id, seed in rows]
        return np.asarray(sample_specs(runner, run.load_config(), specs, batch_size=8).images)
    finally:
        runner.close()


def _error(response: _Response) -> str:
    assert response.has_error(), "expected an error response, got images"
    error = response.error()
    assert error is not None
    return error.message()


def _images(response: _Response) -> np.ndarray:
    assert not response.has_error(), response.error().message()  # type: ignore[union-attr]
    return response.tensors["IMAGE"].as_numpy()


@pytest.fixture(scope="module")
def class_model(exported_tiny_run: RunDir) -> Any:
    with pytest.MonkeyPatch.context() as monkeypatch:
        model = _load_model(exported_tiny_run, monkeypatch)
        yield model
        model.finalize()


def test_bad_requests_in_a_batch_get_their_own_errors_and_good_ones_their_images(
        class_model: Any, exported_tiny_run: RunDir) -> None:
    """One `execute` call (one dynamic batch) mixing good requests with every kind of bad one: each bad
    request gets an error naming its problem, each good one the images the library makes for it."""
    bad = {
        "no condition": (_Request(SEED=_rows([0], np.int64)), "send CLASS (a class name or id) or CLASS_ID"),
        "empty": (_Request(CLASS_ID=np.zeros((0, 1), np.int32)), "the request has no images (empty batch)"),
        "column length": (_class_request([1], [0], INDEX=_rows([0, 1], np.int64)), "INDEX has 2 values for 1 images"),
        "negative seed": (_class_request([1], [-3]), "seed -3 is negative"),
        "negative index": (_class_request([1], [0], INDEX=_rows([-1], np.int64)), "index -1 is negative"),
        "nan guidance": (_class_request([1], [0], CFG_SCALE=_rows([np.nan], np.float32)),
                         "cfg_scale nan is out of range"),
        "guidance too large": (_class_request([1], [0], CFG_SCALE=_rows([1e30], np.float32)),
                               "is out of range: use 0..50"),
        "steps too many": (_Request(CLASS_ID=_rows([1], np.int32), STEPS=_rows([100000], np.int32)),
                           "steps 100000 is out of range: use 1..250"),
        "unknown class name": (_Request(CLASS=_rows([b"blue moon"], np.object_)), "unknown class 'blue moon'"),
        "class id out of range": (_class_request([99], [0]), "class id 99 is out of range"),
        "prompt to a class model": (_Request(PROMPT=_rows([b"a red circle"], np.object_)),
                                    "this model is class-conditioned: it takes CLASS"),
        "class and id together": (_Request(CLASS=_rows([b"shape 1"], np.object_), CLASS_ID=_rows([1], np.int32)),
                                  "the request mixes CLASS and CLASS_ID"),
        "sampler not served": (_class_request([1], [0], SAMPLER=_rows([b"dpmpp-2m"], np.object_)),
                               "sampler 'dpmpp-2m' is not served here: use one of ddim, ddpm"),
    }
    good = [_class_request([3], [11]), _class_request([5, 7], [12, 13]),
            _Request(CLASS=_rows([b"shape 2"], np.object_), SEED=_rows([14], np.int64), STEPS=_rows([STEPS], np.int32))]
    requests: list[_Request] = []
    for k, (request, _message) in enumerate(bad.values()):  # a good request between bad ones
        requests.append(request)
        if k < len(good):
            requests.append(good[k])
    responses = class_model.execute(requests)
    assert len(responses) == len(requests)
    by_request = {id(r): response for r, response in zip(requests, responses, strict=True)}
    for name, (request, message) in bad.items():
        assert message in _error(by_request[id(request)]), name
    served = np.concatenate([_images(by_request[id(r)]) for r in good])
    expected = _reference(exported_tiny_run, [(3, 11), (5, 12), (7, 13), (2, 14)])
    assert served.shape == expected.shape == (4, 32, 32, 3) and served.dtype == np.uint8
    assert np.array_equal(served, expected)  # the good requests sampled together, as the library does


def test_a_failing_merged_batch_is_retried_request_by_request(class_model: Any, exported_tiny_run: RunDir,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """When sampling the merged batch raises (one request's generation fails at run time), every request
    is sampled alone: the others still get their images and only the failing one gets the error."""
    real_sample_specs = class_model._sample_specs
    calls: list[list[int]] = []

    def fails_with_seed_666(runner: Any, config: Any, specs: list[Any], **kwargs: Any) -> Any:
        calls.append([s.seed for s in specs])
        if any(s.seed == 666 for s in specs):
            raise RuntimeError("the runtime ran out of memory")
        return real_sample_specs(runner, config, specs, **kwargs)

    monkeypatch.setattr(class_model, "_sample_specs", fails_with_seed_666)
    requests = [_class_request([3], [11]), _class_request([4], [666]), _class_request([5, 7], [12, 13])]
    responses = class_model.execute(requests)
    assert calls == [[11, 666, 12, 13], [11], [666], [12, 13]]  # merged first, then each request alone
    assert _error(responses[1]) == "generation failed: RuntimeError: the runtime ran out of memory"
    for response, rows in ((responses[0], [(3, 11)]), (responses[2], [(5, 12), (7, 13)])):
        assert np.array_equal(_images(response), _reference(exported_tiny_run, rows))


def test_a_text_model_refuses_classes_and_missing_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation needs no sampling: the model on the ensemble layout's runner (BLS calls, never made
    here) parses the requests of a text run."""
    from text_helpers import make_text_run

    run = make_text_run(tmp_path / "run")
    model = _load_model(run, monkeypatch, runner="bls")
    requests = [_Request(CLASS_ID=_rows([1], np.int32)), _Request(SEED=_rows([0], np.int64)),
                _Request(PROMPT=_rows([b"a red circle"], np.object_), CLASS=_rows([b"red circle"], np.object_))]
    messages = [_error(r) for r in model.execute(requests)]
    assert "this model is text-to-image: send PROMPT (a text prompt), not CLASS_ID" in messages[0]
    assert "send PROMPT (a text prompt): this model is text-to-image" in messages[1]
    assert "the request mixes CLASS and PROMPT" in messages[2]


CACHED_STEPS = 6  # enough steps for every:2 and every:3 to skip the body on some


def _cached_request(class_ids: list[int], seeds: list[int], cache: str | None) -> _Request:
    extra = {} if cache is None else {"CACHE": _rows([cache.encode()] * len(class_ids), np.object_)}
    return _Request(CLASS_ID=_rows(class_ids, np.int32), SEED=_rows(seeds, np.int64),
                    STEPS=_rows([CACHED_STEPS] * len(class_ids), np.int32), **extra)


@pytest.fixture(scope="module")
def cached_model(parts_run: RunDir) -> Any:
    """The model on a run with the denoiser's parts; requests that send no policy get every:3."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        model = _load_model(parts_run, monkeypatch, default_cache="every:3")
        yield model
        model.finalize()


def test_requests_with_different_cache_policies_in_one_batch_get_the_images_served_alone(
        cached_model: Any, parts_run: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """One dynamic batch mixing policies (and two requests under the same adaptive policy, whose decisions
    are taken over a batch): each request gets exactly the images it gets alone, which are the library's
    for the same settings; a request that sends no policy gets the server's default. The tiny random
    model's uint8 images hardly depend on the policy, so what ran is read from the sampling results too."""
    from mmgen_deploy.runtime import open_runner
    from mmgen_deploy.sampling.requests import ImageSpec, sample_specs

    real_sample_specs = cached_model._sample_specs
    generated: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        generated.append(real_sample_specs(*args, **kwargs))
        return generated[-1]

    monkeypatch.setattr(cached_model, "_sample_specs", recording)

    requests = {
        "every:2": _cached_request([3, 4], [21, 22], "every:2"),
        "none": _cached_request([5], [23], "none"),
        "adaptive:0.3 (a)": _cached_request([6, 7], [24, 25], "adaptive:0.3"),
        "adaptive:0.3 (b)": _cached_request([8], [26], "ADAPTIVE:0.30"),  # the same policy, spelled otherwise
        "default every:3": _cached_request([9], [27], None),
    }
    merged = cached_model.execute(list(requests.values()))
    # Sampled in one call, in groups: a policy's images together, an adaptive policy's per request.
    assert len(generated) == 1
    groups = [(r.cache.policy, len(r.images), r.cache.recompute_steps) for r in generated[0].results]
    assert groups == [("every:2", 2, [[0, 2, 4, 5]]), ("none", 1, []),
                      ("adaptive:0.3", 2, groups[2][2]), ("adaptive:0.3", 1, groups[3][2]),
                      ("every:3", 1, [[0, 3, 5]])]
    alone = [cached_model.execute([request])[0] for request in requests.values()]
    runner, _ = open_runner(parts_run.root, "onnxruntime", "fp32", threads=1)
    try:
        for (name, request), together, single in zip(requests.items(), merged, alone, strict=True):
            served = _images(together)
            assert np.array_equal(served, _images(single)), name
            policy = name.split(" ")[-1] if name.startswith("default") else name.split(" ")[0]
            specs = [ImageSpec(seed=int(seed), class_id=int(c), steps=CACHED_STEPS, cache=policy)
                     for c, seed in zip(request.inputs["CLASS_ID"].as_numpy().ravel(),
                                        request.inputs["SEED"].as_numpy().ravel(), strict=True)]
            library = sample_specs(runner, parts_run.load_config(), specs, batch_size=8)
            assert [r.cache.policy for r in library.results] == [policy]
            assert np.array_equal(served, library.images), name
    finally:
        runner.close()


def test_bad_cache_policies_and_a_server_without_parts_are_refused_in_one_line(
        cached_model: Any, class_model: Any) -> None:
    """A malformed policy is refused like any bad field, next to a good request that is served; a server
    whose run has no denoiser parts refuses every policy but none, saying how to export them."""
    bad = {"sometimes": "unknown cache policy 'sometimes'", "every:0": "every:0: N must be a whole number >= 1",
           "adaptive:-1": "adaptive:-1: T must be a number > 0", "none:2": "cache policy none takes no value"}
    requests = [_cached_request([1], [0], policy) for policy in bad]
    good = _cached_request([2], [5], "every:2")
    responses = cached_model.execute([*requests, good])
    for (policy, message), response in zip(bad.items(), responses, strict=False):
        assert message in _error(response), policy
        assert "\n" not in _error(response)
    assert _images(responses[-1]).shape == (1, 32, 32, 3)

    no_parts = class_model.execute([_cached_request([1], [0], "every:2"), _cached_request([1], [0], "none")])
    message = _error(no_parts[0])
    assert message.startswith("cache every:2 is not served here: missing ") and "denoiser_head" in message
    assert "--components denoiser_parts" in message and "\n" not in message
    assert _images(no_parts[1]).shape == (1, 32, 32, 3)  # the whole denoiser is still served


def test_an_audio_run_serves_the_waveforms_generate_writes(audio_run: RunDir, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The served AUDIO of a row is the float32 waveform `mmgen generate` writes for the same seed, index
    and class (ONNX Runtime FP32, one thread), so its WAV has the same bytes; IMAGE is the spectrogram."""
    from mmgen_deploy.data.wav import decode_wav, encode_wav
    from mmgen_deploy.sampling.generate import GenerateRequest, generate_to_folder

    generated = generate_to_folder(audio_run, GenerateRequest(
        classes=["square rising", "1"], n=1, steps=STEPS, seed=3, backend="onnxruntime", precision="fp32",
        threads=1, out=tmp_path / "generated"))
    model = _load_model(audio_run, monkeypatch)
    try:
        [response] = model.execute([_Request(CLASS=np.asarray([[b"square rising"], [b"1"]], dtype=np.object_),
                                             SEED=_rows([3, 3], np.int64), INDEX=_rows([0, 1], np.int64),
                                             STEPS=_rows([STEPS, STEPS], np.int32))])
        client_files = _client_files(model, audio_run, tmp_path / "client", class_ids=[3, 1], seed=3)
    finally:
        model.finalize()
    images = _images(response)
    waveforms = response.tensors["AUDIO"].as_numpy()
    config = audio_run.load_config()
    assert config.audio is not None and generated.result.audio is not None
    assert waveforms.dtype == np.float32 and waveforms.shape == (2, config.audio.clip_samples)
    np.testing.assert_array_equal(images, generated.result.images)
    np.testing.assert_array_equal(waveforms, generated.result.audio)
    for k, entry in enumerate(generated.sidecar["images"]):
        written = (tmp_path / "generated" / entry["file"]).read_bytes()
        settings = decode_wav(written).settings
        assert settings is not None
        assert encode_wav(waveforms[k], config.audio.sample_rate, settings=settings) == written
        # `mmgen client`'s files: the same names, the same sample data (its INFO chunk names backend triton)
        served = decode_wav(client_files[entry["file"]])
        np.testing.assert_array_equal(served.samples, decode_wav(written).samples)
        assert served.settings is not None and served.settings["backend"] == "triton"
    assert sorted(client_files) == [*sorted(e["file"] for e in generated.sidecar["images"]), "samples.json"]
    assert json.loads(client_files["samples.json"])["audio"]["sample_rate"] == config.audio.sample_rate


class _InProcessRemote:
    """What `mmgen client` asks of its server (`GenerateClient.generate_outputs`), answered by the model
    in this process: the client's own request assembly and file writing run unchanged."""

    url = "in-process"

    def __init__(self, model: Any) -> None:
        self.model = model

    def generate_outputs(self, request: Any, *, audio: bool) -> tuple[np.ndarray, np.ndarray | None]:
        [response] = self.model.execute([_Request(
            CLASS_ID=_rows(request.class_ids, np.int32), SEED=_rows(request.seeds, np.int64),
            INDEX=_rows(request.indices, np.int64), STEPS=_rows([request.steps] * len(request.seeds), np.int32),
            CFG_SCALE=_rows([request.cfg_scale] * len(request.seeds), np.float32),
            SAMPLER=np.asarray([[request.sampler.encode()]] * len(request.seeds), dtype=np.object_))])
        return _images(response), response.tensors["AUDIO"].as_numpy() if audio else None


def _client_files(model: Any, run: RunDir, out: Path, *, class_ids: list[int], seed: int) -> dict[str, bytes]:
    """The files `mmgen client` writes for these classes (one clip each) from `model`, by name."""
    from mmgen_deploy.cli.serve import _request_images
    from mmgen_deploy.io_utils import write_json
    from mmgen_deploy.sampling.files import write_samples
    from mmgen_deploy.serve.client import ServedModel

    config = run.load_config()
    served = ServedModel.from_model_config({"max_batch_size": 8, "parameters": {
        "run_config": {"string_value": json.dumps(config.to_dict())}}})
    result = _request_images(_InProcessRemote(model), served, class_ids, None, seed=seed,  # type: ignore[arg-type]
                             steps=STEPS, cfg_scale=served.default_cfg_scale, sampler=served.default_sampler,
                             cache="none")
    sidecar = write_samples(result, config, out, images_per_class=1)
    write_json(out / "samples.json", sidecar)
    return {path.name: path.read_bytes() for path in out.iterdir() if path.name != "grid.png"}


def test_an_audio_repository_declares_the_waveform_and_serves_the_vocoder(audio_run: RunDir,
                                                                           tmp_path: Path) -> None:
    from mmgen_deploy.serve import MODEL_NAME
    from mmgen_deploy.serve.repository import RepositoryOptions, model_config_pbtxt, write_repository

    assert "AUDIO" not in model_config_pbtxt((32, 32, 1), RepositoryOptions(), "run")
    config = audio_run.load_config()
    assert config.audio is not None
    summary = write_repository(audio_run.root, tmp_path / "repo", RepositoryOptions(
        layout="ensemble", component_backend="python", artifacts="reference", vendor_source=False))
    text = (tmp_path / "repo" / MODEL_NAME / "config.pbtxt").read_text()
    assert f'{{ name: "AUDIO" data_type: TYPE_FP32 dims: [ {config.audio.clip_samples} ] }}' in text
    assert "vocoder" in summary["components"] and (tmp_path / "repo" / "mmgen_vocoder" / "config.pbtxt").is_file()
    assert "| AUDIO (output) | FP32" in (tmp_path / "repo" / "README.md").read_text()
