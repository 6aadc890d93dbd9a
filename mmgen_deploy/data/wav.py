"""16-bit PCM WAV files, written with a RIFF INFO chunk that records how a clip was made.

Python's `wave` module writes no INFO (LIST) chunk and reads none, so both directions are written
here against the RIFF layout: ``RIFF <size> WAVE``, then chunks ``<id> <size> <data>`` (data padded
to an even length): ``fmt `` (PCM format 1, channels, rate, byte rate, block align, bits), ``data``
(little-endian samples) and ``LIST <size> INFO`` holding sub-chunks such as ``ICMT`` (a comment) and
``ISFT`` (the software), each a NUL-terminated string. The settings go into ``ICMT`` as JSON.

Reading accepts what the tools users have write: 16-bit PCM, 24/32-bit PCM and 32-bit float
(``WAVE_FORMAT_EXTENSIBLE`` too), any channel count; a truncated file, another encoding or an empty
data chunk is a one-line `MMGenError` naming the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmgen_deploy.errors import MMGenError

_PCM = 1
_FLOAT = 3
_EXTENSIBLE = 0xFFFE
SOFTWARE = "mmgen-deploy"
# INFO sub-chunk ids this module writes: the settings (JSON) and the software that wrote the file.
INFO_COMMENT = "ICMT"
INFO_SOFTWARE = "ISFT"


@dataclass
class WavFile:
    """Samples (frames, channels) float32 in [-1, 1], the sample rate, and the INFO strings."""

    samples: np.ndarray
    sample_rate: int
    info: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any] | None:
        """The JSON settings mmgen recorded in ICMT, or None."""
        text = self.info.get(INFO_COMMENT)
        if not text:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None


def _chunk(chunk_id: bytes, payload: bytes) -> bytes:
    pad = b"\0" if len(payload) % 2 else b""
    return chunk_id + struct.pack("<I", len(payload)) + payload + pad


def info_chunk(info: dict[str, str]) -> bytes:
    """A ``LIST``/``INFO`` chunk of NUL-terminated strings (ids of four ASCII characters)."""
    body = b"INFO"
    for key, value in info.items():
        if len(key) != 4 or not key.isascii():
            raise ValueError(f"INFO ids are four ASCII characters, got {key!r}")
        body += _chunk(key.encode("ascii"), value.encode("utf-8") + b"\0")
    return _chunk(b"LIST", body)


def encode_wav(samples: np.ndarray, sample_rate: int, *, settings: dict[str, Any] | None = None) -> bytes:
    """The bytes of a 16-bit PCM WAV of `samples` ((frames,) mono or (frames, channels), floats in
    [-1, 1], clipped), with an INFO chunk holding `settings` as JSON when given."""
    data = np.asarray(samples, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[1] < 1:
        raise ValueError(f"expected (frames,) or (frames, channels) samples, got shape {data.shape}")
    channels = data.shape[1]
    pcm = np.clip(np.rint(np.nan_to_num(data) * 32768.0), -32768, 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", _PCM, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    chunks = _chunk(b"fmt ", fmt) + _chunk(b"data", pcm)
    if settings is not None:
        chunks += info_chunk({INFO_COMMENT: json.dumps(settings, sort_keys=True), INFO_SOFTWARE: SOFTWARE})
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int, *,
              settings: dict[str, Any] | None = None) -> Path:
    """`encode_wav` written atomically to `path`."""
    from mmgen_deploy.io_utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode_wav(samples, sample_rate, settings=settings))
    return path


def _bad(path: str, what: str) -> MMGenError:
    return MMGenError(f"cannot read WAV file {path}: {what}", "replace the file with a PCM or float WAV, or remove it")


def _parse_info(body: bytes) -> dict[str, str]:
    info: dict[str, str] = {}
    offset = 4  # after b"INFO"
    while offset + 8 <= len(body):
        key, size = body[offset:offset + 4], struct.unpack("<I", body[offset + 4:offset + 8])[0]
        value = body[offset + 8:offset + 8 + size]
        info[key.decode("ascii", "replace")] = value.split(b"\0", 1)[0].decode("utf-8", "replace")
        offset += 8 + size + (size % 2)
    return info


def decode_wav(raw: bytes, name: str = "<bytes>") -> WavFile:
    """Parse WAV bytes (see the module doc for what is accepted); `name` appears in errors."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise _bad(name, "not a RIFF/WAVE file")
    fmt: tuple[int, ...] | None = None
    data: bytes | None = None
    info: dict[str, str] = {}
    offset = 12
    while offset + 8 <= len(raw):
        chunk_id, size = raw[offset:offset + 4], struct.unpack("<I", raw[offset + 4:offset + 8])[0]
        body = raw[offset + 8:offset + 8 + size]
        if len(body) < size:
            raise _bad(name, f"the file is truncated (its {chunk_id.decode('ascii', 'replace').strip()!r} chunk "
                             f"announces {size} bytes, {len(body)} are there)")
        if chunk_id == b"fmt ":
            if size < 16:
                raise _bad(name, "its fmt chunk is too short")
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == _EXTENSIBLE and size >= 26:  # the real format is the sub-format GUID's first two bytes
                fmt = (struct.unpack("<H", body[24:26])[0], *fmt[1:])
        elif chunk_id == b"data":
            data = body
        elif chunk_id == b"LIST" and body[:4] == b"INFO":
            info = _parse_info(body)
        offset += 8 + size + (size % 2)
    if fmt is None or data is None:
        raise _bad(name, f"it has no {'fmt' if fmt is None else 'data'} chunk")
    encoding, channels, sample_rate, _, _, bits = fmt
    if channels < 1 or sample_rate < 1:
        raise _bad(name, f"{channels} channels at {sample_rate} Hz")
    if encoding == _PCM and bits in (16, 24, 32):
        width = bits // 8
        usable = len(data) // (width * channels) * width * channels
        if bits == 24:
            triples = np.frombuffer(data[:usable], dtype=np.uint8).reshape(-1, 3).astype(np.int32)
            ints = (triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)) << 8 >> 8
            values = ints.astype(np.float32) / float(1 << 23)
        else:
            values = np.frombuffer(data[:usable], dtype=f"<i{width}").astype(np.float32) / float(1 << (bits - 1))
    elif encoding == _FLOAT and bits == 32:
        usable = len(data) // (4 * channels) * 4 * channels
        values = np.frombuffer(data[:usable], dtype="<f4").astype(np.float32)
    else:
        raise _bad(name, f"its encoding (format {encoding}, {bits} bits) is not 16/24/32-bit PCM or 32-bit float")
    if values.size == 0:
        raise _bad(name, "it holds no samples")
    return WavFile(values.reshape(-1, channels), int(sample_rate), info)


def read_wav(path: str | Path) -> WavFile:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _bad(str(path), exc.strerror or type(exc).__name__) from None
    return decode_wav(raw, str(path))
