"""Image-text readers: tar shards (truncated, incomplete samples), undecodable images and crops."""

from __future__ import annotations

import io
import random
import tarfile

import numpy as np

from raytrain.data import imagetext, shapes
from tests.data.test_synsets import _Counter


def write_shard(path, records: list[tuple[str, bytes | None, str | None]]) -> bytes:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in records:
            for ext, data in (("png", image), ("txt", caption.encode() if caption is not None else None)):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_tar_shard_samples_incomplete_and_truncated(tmp_path) -> None:
    image = shapes.sample(0, 0, shapes.WorldConfig())["image"]
    data = write_shard(tmp_path / "a.tar", [("k0", image, "a dog"), ("k1", None, "no image"), ("k2", image, "x"),
                                            ("k3", image, "y")])
    counter = _Counter()
    rows = list(imagetext.tar_samples(io.BytesIO(data), "a.tar", counter))
    assert [r["key"] for r in rows] == ["k0", "k2", "k3"] and rows[0]["caption"] == "a dog"
    assert counter.counts == {"incomplete_samples": 1}
    png_block = 512 + -(-len(image) // 512) * 512  # header + padded data
    cut = data[:png_block + 3 * 1024 + 600]  # k0.png, k0.txt, k1.txt, then into k2.png's data
    rows = list(imagetext.tar_samples(io.BytesIO(cut), "cut.tar", counter))
    assert [r["key"] for r in rows] == ["k0"]  # what precedes the damage is kept
    assert counter.counts["truncated_shards"] == 1


def test_undecodable_images_are_dropped_and_counted() -> None:
    cfg = imagetext.ImageTextDataConfig(image_size=32)
    image = shapes.sample(0, 0, shapes.WorldConfig())["image"]
    counter = _Counter()
    out = imagetext.decode_batch({"key": ["a", "b", "c"], "image": [image, b"\x89PNG broken", image],
                                  "caption": ["x", "y", "z"]}, cfg, True, counter)
    assert out["image"].shape == (2, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["caption"] == ["x", "z"] and counter.counts == {"undecodable_images": 1}


def test_random_resized_crop_boxes_stay_inside_and_respect_the_ranges() -> None:
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = imagetext.random_resized_crop_box(120, 80, [0.08, 1.0], [0.75, 4 / 3], rng)
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
        assert 0.08 * 9600 * 0.9 <= (right - left) * (bottom - top) <= 9600
    assert imagetext.center_box(120, 80) == (20, 0, 100, 80)


def test_an_image_folder_gives_sorted_classes_and_labels_from_the_folder_names(tmp_path, ray_cluster) -> None:
    import pytest

    from raytrain.data.imagetext import ImageDataError

    image = shapes.sample(0, 0, shapes.WorldConfig())["image"]
    for name, files in {"n02084071": ["a.png", "b.PNG"], "goldfish": ["c.png"], "heart": ["d.png", "notes.txt"]}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(image if not f.endswith(".txt") else b"not an image")
    classes = imagetext.image_folder_classes(str(tmp_path))
    assert classes == ["goldfish", "heart", "n02084071"]
    rows = imagetext.image_folder(str(tmp_path), classes).take_all()
    labels = sorted((r["key"].split("/")[-1], int(r["label"])) for r in rows)
    assert labels == [("a.png", 2), ("b.PNG", 2), ("c.png", 0), ("d.png", 1)]
    assert all(bytes(r["image"]) == image for r in rows)
    with pytest.raises(ImageDataError, match=r"goldfish: 0 class folder\(s\); a classifier needs at least 2"):
        imagetext.image_folder_classes(str(tmp_path / "goldfish"))
