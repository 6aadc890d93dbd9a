"""An ONNX model on disk is a graph file plus the external-data files it names.

Protobuf cannot serialise one message over 2 GiB, so a large model (a DiT-XL/2 is 2.7 GB
in FP32) keeps its weights in a file beside the graph (`denoiser.onnx.data`); the graph
refers to it by a relative location. Everything that identifies, ships or checks a graph
must therefore treat the set as one: its hash (export manifest, engine staleness), its
size, and its copies (Triton repositories). This module is that one owner. It imports
neither torch nor (until called) onnx, so runtimes and engine checks can use it.

The hash of a single-file graph is the plain sha256 of the file (as before external data
existed); a graph with external data hashes to sha256 over the graph's sha256 and each
data file's location and sha256, so changing only the weights changes the hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from mmgen_deploy.io_utils import sha256_file_remembered


def data_path(path: str | os.PathLike[str]) -> Path:
    """Where mmgen writes the external data of `path`: `<name>.onnx.data` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def file_stats(path: str | os.PathLike[str]) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the graph and of the external data mmgen writes beside it: the
    cheap identity the compiled-model and rewritten-graph caches key on (stat only, no parsing)."""
    path = Path(path)
    files = [path] + [p for p in (data_path(path),) if p.is_file()]
    return [(p.name, s.st_size, s.st_mtime_ns) for p in files for s in (p.stat(),)]


def external_locations(path: str | os.PathLike[str]) -> list[str]:
    """The distinct external-data locations the graph names (relative to its folder), in file order.

    Reads the graph only (`load_external_data=False`): megabytes even for a 2.7 GB model. A file
    that does not parse names none (its hash is then the file's own, which differs from any recorded).
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a damaged graph (DecodeError): it names no data file anyone can rely on
        return []
    locations = {entry["location"]: None for entry in _external_entries(model.graph) if "location" in entry}
    return list(locations)


def _external_entries(graph: Any) -> list[dict[str, str]]:
    """The external-data entries (location, offset, length) of every tensor of `graph` and its subgraphs."""
    import onnx

    tensors = list(graph.initializer)
    entries = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            elif attr.type == onnx.AttributeProto.GRAPH:
                entries += _external_entries(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    entries += _external_entries(sub)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries.append({entry.key: entry.value for entry in tensor.external_data})
    return entries


def damage(path: str | os.PathLike[str]) -> str | None:
    """Why the ONNX set at `path` is not whole (its graph does not parse, or an external-data file is
    missing or shorter than the graph reads), or None. Reads the graph only, never the weights; what
    a runtime that fails to parse a file calls first, so a truncated copy is not blamed on an op."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # DecodeError and friends: the protobuf itself is cut short or damaged
        return f"{path.name} is truncated or damaged: ONNX cannot read it either"
    for entry in _external_entries(model.graph):
        file = path.parent / entry.get("location", "")
        if not file.is_file():
            return f"{path.name} keeps its weights in {entry.get('location')}, which is missing beside it"
        end = int(entry.get("offset", 0) or 0) + int(entry.get("length", 0) or 0)
        if end > file.stat().st_size:
            return (f"{file.name} is truncated: {file.stat().st_size} bytes, and {path.name} reads up to byte "
                    f"{end}")
    return None


def data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external-data files of the graph at `path` (empty for a self-contained graph).

    Raises FileNotFoundError naming a data file the graph refers to that is not there.
    """
    path = Path(path)
    files = []
    for location in external_locations(path):
        file = path.parent / location
        if not file.is_file():
            raise FileNotFoundError(f"{path.name} keeps its weights in {location}, which is missing beside it")
        files.append(file)
    return files


def onnx_files(path: str | os.PathLike[str]) -> list[Path]:
    """The graph and its external-data files: what must be copied, hashed or removed together."""
    return [Path(path), *data_files(path)]


def onnx_sha256(path: str | os.PathLike[str], *, data: list[Path] | None = None) -> str:
    """The identity of an ONNX model on disk: graph plus external data (see the module doc).

    `data`: the external-data files, when the caller knows them (else read from the graph). Each
    file's hash is remembered across processes while the file is provably unchanged
    (`io_utils.sha256_file_remembered`), so a 2.7 GB graph set is read once, not on every open.
    """
    path = Path(path)
    extra = data_files(path) if data is None else data
    graph = sha256_file_remembered(path)
    if not extra:
        return graph
    digest = hashlib.sha256(f"graph {graph}\n".encode())
    for file in extra:
        digest.update(f"data {file.relative_to(path.parent).as_posix()} {sha256_file_remembered(file)}\n".encode())
    return digest.hexdigest()


def matches_sha256(path: str | os.PathLike[str], recorded: str) -> bool:
    """Whether the graph set at `path` is the one whose `onnx_sha256` was `recorded`.

    Tries mmgen's own layout first (the data file, if any, is `<name>.onnx.data` beside the graph):
    when the graph bytes are the recorded ones, so are the data locations they name, and nothing
    has to be parsed. Only a mismatch reads the graph for the locations it names. Raises
    FileNotFoundError for a data file the graph names that is missing.
    """
    path = Path(path)
    guess = [data_path(path)] if data_path(path).is_file() else []
    return onnx_sha256(path, data=guess) == recorded or onnx_sha256(path) == recorded


def onnx_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of the graph plus its external data."""
    return sum(f.stat().st_size for f in onnx_files(path))


def copy_onnx(source: str | os.PathLike[str], target: str | os.PathLike[str], *, link: bool = False) -> list[Path]:
    """Copy (or hard-link, where possible) a graph and its data files; the data files keep their names
    (the graph refers to them by name). Returns the files written."""
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for file in onnx_files(source):
        dest = target if file == source else target.parent / file.relative_to(source.parent)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(file, dest)
                written.append(dest)
                continue
            except OSError:
                pass
        shutil.copy2(file, dest)
        written.append(dest)
    return written
