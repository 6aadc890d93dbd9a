"""Test helper for graphs edited inside a run's export."""

from __future__ import annotations

from pathlib import Path

from mmgen_deploy.io_utils import read_json, write_json
from mmgen_deploy.onnx_files import onnx_sha256


def record_as_exported(graph: Path) -> None:
    """Record the current sha256 of `graph` (RUN/onnx/<precision>/<component>.onnx) in its run's export
    manifest, as an export step that wrote this graph would have.

    Tests that plant a numerical bug in a graph to show that parity (or export validation) catches it
    model a faulty export or converter, whose output the manifest records; a graph replaced after
    the export is a different case, refused by every runner before parity could run it.
    """
    manifest_path = graph.parents[1] / "manifest.json"
    manifest = read_json(manifest_path)
    manifest["files"][graph.parent.name][graph.stem]["sha256"] = onnx_sha256(graph)
    write_json(manifest_path, manifest)
