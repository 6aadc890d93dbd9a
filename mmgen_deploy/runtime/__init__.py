"""Interchangeable backends behind one `Runner` interface.

Every backend is one entry of `backends.REGISTRY` (name, precisions, devices, the ONNX sets it
reads, its availability check) plus one `BaseRunner` subclass in this package, opened the same
way: `Backend.from_run_dir(run, precision, device, **options)`. `open_runner(run_dir, backend,
precision)` applies the selection policy of `select` ("auto": the first step of
`backends.AUTO_ORDER` that runs here) and returns `(runner, choice)`. Heavy modules (torch,
onnxruntime, openvino, tensorrt) are imported only by the backend used.
"""

from mmgen_deploy.runtime.backends import BACKENDS, REGISTRY, BackendChoice, BackendSpec
from mmgen_deploy.runtime.base import BaseRunner, Runner, check_feeds
from mmgen_deploy.runtime.select import open_runner, resolve_backend, runner_class

__all__ = ["BACKENDS", "REGISTRY", "BackendChoice", "BackendSpec", "BaseRunner", "Runner", "check_feeds",
           "open_runner", "resolve_backend", "runner_class"]
