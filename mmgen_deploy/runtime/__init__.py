"""Interchangeable backends behind one `Runner` interface.

Every backend is a `BaseRunner` subclass in this package (`torch_runner`, `ort_runner`,
`openvino_runner`, `tensorrt_runner`), opened the same way: `Backend.from_run_dir(run, precision, device, **options)`.
`open_runner(run_dir, backend, precision)` applies the selection policy of `select`
("auto": the fastest that is available and runnable here) and returns `(runner, choice)`.
Heavy modules (torch, onnxruntime, openvino, tensorrt) are imported only by the backend used.
"""

from mmgen_deploy.runtime.base import BACKENDS, BaseRunner, Runner, check_feeds
from mmgen_deploy.runtime.select import BackendChoice, open_runner, resolve_backend, runner_class

__all__ = ["BACKENDS", "BackendChoice", "BaseRunner", "Runner", "check_feeds", "open_runner",
           "resolve_backend", "runner_class"]
