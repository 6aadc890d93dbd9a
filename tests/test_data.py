from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmgen_deploy.data import DataSpec, load_split
from mmgen_deploy.data.folder import load_folder
from mmgen_deploy.data.shapes import CLASS_NAMES, COLOURS, ShapeSpec, make_shapes
from mmgen_deploy.errors import MMGenError, UsageError


def test_shapes_is_deterministic_and_split() -> None:
    a, b = make_shapes(40, seed=3), make_shapes(40, seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels) and a.captions == b.captions
    assert not np.array_equal(a.images, make_shapes(40, seed=4).images)
    assert not np.array_equal(a.images, make_shapes(40, seed=3, split="val").images)
    assert a.images.shape == (40, 32, 32, 3) and a.images.dtype == np.uint8
    assert make_shapes(4, seed=0, image_size=64).images.shape == (4, 64, 64, 3)


def test_shapes_classes_captions_and_pure_colours() -> None:
    assert len(CLASS_NAMES) == 18 and CLASS_NAMES[0] == "red circle"
    assert ShapeSpec("red", "circle", "small", "left").caption == "a small red circle on the left"
    data = make_shapes(200, seed=0)
    assert set(data.labels.tolist()) == set(range(18))  # every class is drawn
    for image, label, caption in zip(data.images[:50], data.labels[:50], data.captions[:50], strict=True):
        colour, shape = CLASS_NAMES[label].split()
        assert f"{colour} {shape}" in caption and ("small" in caption or "large" in caption)
        # Background is black and every lit pixel is a scaled copy of the pure class colour.
        assert image[0, 0].tolist() == [0, 0, 0] or image[-1, -1].tolist() == [0, 0, 0]
        lit = image.reshape(-1, 3)[image.reshape(-1, 3).max(axis=1) > 0]
        pure = np.asarray(COLOURS[colour]) > 0
        assert np.all((lit > 0) == pure)


def _png(path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_with_class_subfolders(tmp_path) -> None:
    _png(tmp_path / "dogs" / "a.png", (40, 60), (200, 10, 10))
    _png(tmp_path / "dogs" / "b.jpg", (64, 64), (10, 200, 10))
    _png(tmp_path / "cats" / "c.png", (50, 30), (10, 10, 200))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    data = load_folder(tmp_path, 32)
    assert data.class_names == ("cats", "dogs")
    assert data.images.shape == (3, 32, 32, 3) and data.labels.tolist() == [0, 1, 1]
    assert data.images[0, 16, 16].tolist() == [10, 10, 200]  # resized, centre-cropped, RGB


def test_image_folder_with_metadata_jsonl(tmp_path) -> None:
    _png(tmp_path / "x.png", (32, 32), (255, 0, 0))
    _png(tmp_path / "y.png", (32, 48), (0, 255, 0))
    _png(tmp_path / "unlisted.png", (32, 32), (0, 0, 255))
    lines = [{"file_name": "y.png", "text": "a green thing"}, {"file_name": "x.png", "text": "a red thing"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = load_folder(tmp_path, 16)
    assert data.captions == ["a red thing", "a green thing"] and len(data.class_names) == 1
    assert data.images.shape == (2, 16, 16, 3)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "?"}\n')
    with pytest.raises(UsageError, match=r"missing\.png"):
        load_folder(tmp_path, 16)


def test_folder_errors(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        load_folder(tmp_path / "empty", 32)
    bad = tmp_path / "bad" / "cls" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not a png")
    with pytest.raises(MMGenError, match=r"cannot read image .*broken.png"):
        load_folder(tmp_path / "bad", 32)
    with pytest.raises(UsageError, match="neither a built-in dataset"):
        DataSpec.parse(str(tmp_path / "nope"), image_size=32, seed=0)


def test_folder_split_is_deterministic_and_disjoint(tmp_path) -> None:
    for i in range(10):
        _png(tmp_path / "c" / f"{i}.png", (32, 32), (i * 20, 0, 0))
    spec = DataSpec.parse(str(tmp_path), image_size=32, seed=1)
    train, val = load_split(spec, "train"), load_split(spec, "val")
    assert len(train) == 9 and len(val) == 1
    assert val.images[0, 0, 0, 0] not in train.images[:, 0, 0, 0]
    assert np.array_equal(val.images, load_split(spec, "val").images)
