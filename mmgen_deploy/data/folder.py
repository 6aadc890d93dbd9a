"""User images from a folder, in the two common layouts.

* ImageFolder: ``ROOT/<class name>/<image>``; the sub-folder names become the class names.
* Hugging Face imagefolder: ``ROOT/metadata.jsonl`` with one ``{"file_name": ..., "text": ...}``
  per line; ``text`` becomes the caption. Both can be combined (``file_name`` may point into
  class sub-folders). Images directly in ROOT without sub-folders form a single class
  named after the folder.

Every image is converted to RGB, its shorter side resized to the target size and the
centre cropped to a square.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmgen_deploy.data.dataset import ImageData
from mmgen_deploy.errors import MMGenError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


def _is_image(path: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> bool:
    return path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith(".")


def load_image(path: Path, size: int) -> np.ndarray:
    """Read one image as (size, size, 3) uint8: shorter side resized, centre cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MMGenError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                         "remove or replace the file, then run again") from None


def _read_metadata(root: Path) -> dict[str, str]:
    """file_name (relative to root, '/'-separated) -> caption."""
    captions: dict[str, str] = {}
    path = root / METADATA_FILE
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number} is not valid JSON ({exc.msg})",
                             'each line must look like {"file_name": "a.png", "text": "a caption"}') from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise UsageError(f"{path}:{number} has no string field \"file_name\"",
                             'each line must look like {"file_name": "a.png", "text": "a caption"}')
        name = Path(record["file_name"]).as_posix()
        if not (root / name).is_file():
            raise UsageError(f"{path}:{number} names {name}, which does not exist in {root}",
                             "fix the file name or remove the line")
        captions[name] = str(record.get("text", ""))
    return captions


def scan_folder(root: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, *, kind: str = "images",
                builtin: str = "shapes") -> tuple[list[Path], list[int], list[str], tuple[str, ...]]:
    """Find the files (images, or the `kind` named by `suffixes`): (paths, class ids, captions, class
    names), sorted for determinism."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist", f"pass a folder of {kind}, or use {{data}} {builtin}",
                         params=["data"])
    captions = _read_metadata(root) if (root / METADATA_FILE).is_file() else {}
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in class_dirs if any(_is_image(f, suffixes) for f in d.rglob("*"))]
    paths: list[Path] = []
    labels: list[int] = []
    if class_dirs:
        # With class folders, metadata.jsonl only adds captions to the images it names.
        class_names = tuple(d.name for d in class_dirs)
        for index, folder in enumerate(class_dirs):
            found = sorted(f for f in folder.rglob("*") if _is_image(f, suffixes))
            paths.extend(found)
            labels.extend([index] * len(found))
    else:
        class_names = (root.resolve().name or "image",)
        if captions:
            paths = [root / name for name in sorted(captions)]
        else:
            paths = sorted(f for f in root.iterdir() if _is_image(f, suffixes))
        labels = [0] * len(paths)
    if not paths:
        raise UsageError(f"no {kind} found in {root}",
                         f"put {kind} ({', '.join(suffixes)}) in class sub-folders or list them in "
                         f"{METADATA_FILE}")
    texts = [captions.get(p.relative_to(root).as_posix(), "") for p in paths]
    return paths, labels, texts, class_names


def load_folder(root: str | Path, image_size: int, progress=None) -> ImageData:
    """Load every image of `root` (see the module doc for the layouts)."""
    paths, labels, texts, class_names = scan_folder(root)
    images = []
    for path in paths:
        images.append(load_image(path, image_size))
        if progress is not None:
            progress()
    return ImageData(np.stack(images), np.asarray(labels, dtype=np.int64), texts, class_names)
