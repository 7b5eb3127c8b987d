"""Image-text data on Ray Data: webdataset-style tar shards, parquet files or the procedural world, decoded,
resized, randomly cropped and flipped in Ray Data, and fed to Ray Train workers as fixed-size uint8 images.

Sources (all give rows `key`, `image` (encoded bytes), `caption`):
- tar shards (`*.tar`): members grouped by key (the name up to its first dot), the image in `.jpg`/`.jpeg`/`.png`/
  `.webp`, the caption in `.txt` or in the `caption`/`text` field of `.json`, as webdataset writes them;
- parquet: an image column (bytes, or a struct with a `bytes` field as Hugging Face datasets store it) and a
  caption column;
- `path: null`: the embedded procedural world (`shapes.py`), generated in parallel by Ray Data from record indices.

Bad input never stops a job: an image that does not decode, a tar sample without image or caption, and a truncated
shard (everything up to the damage is kept) are skipped, logged and counted in a `SkipCounter` actor whose totals
the driver reports.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raytrain.config import RaytrainError
from raytrain.data import shapes

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ImageDataError(RaytrainError):
    pass


@dataclass
class ImageTextDataConfig:
    path: str | None = None  # directory, glob or file of .tar shards or .parquet; None = the procedural world
    format: str = "auto"  # webdataset | parquet | auto (by extension)
    image_column: str = "image"  # parquet
    caption_column: str = "caption"  # parquet
    image_size: int = 224  # side of the crops fed to the model
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # and aspect-ratio range
    flip: bool = True  # horizontal flip with probability 1/2
    samples: int = 20000  # procedural world: training records
    eval_samples: int = 1000  # procedural world: held-out records (the indices after the training ones)
    seed: int = 0
    world: shapes.WorldConfig = field(default_factory=shapes.WorldConfig)
    shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer (0 = off)
    shuffle_seed: int = 0  # per-epoch local shuffles derive from it
    caption_tokens: int = 32  # CLIP: captions are cut or padded to this many tokens
    variable_resolution: bool = False  # corenet's variable-batch multi-scale sampler (spec 5.4): each batch at a
    # random side in [min_side, max_side], its size scaled to keep image_size^2 x micro_batch_size pixels
    min_side: int = 128
    max_side: int = 320
    num_scales: int = 25  # requested sides (np.linspace), image_size added, rounded to multiples of side_divisor
    side_divisor: int = 16

    def __post_init__(self) -> None:
        if self.format not in ("auto", "webdataset", "parquet"):
            raise ValueError(f"format={self.format!r}; expected auto, webdataset or parquet")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale={self.crop_scale}; expected 0 < min <= max <= 1")
        if self.variable_resolution and not (self.side_divisor <= self.min_side <= self.image_size <= self.max_side):
            raise ValueError(f"variable_resolution needs side_divisor <= min_side <= image_size <= max_side; got "
                             f"{self.side_divisor}, {self.min_side}, {self.image_size}, {self.max_side}")

    @property
    def decode_size(self) -> int:
        """Side of the crops Ray Data produces: the largest side when batches are resized on the workers."""
        return self.max_side if self.variable_resolution else self.image_size


# ---- skip counting ---------------------------------------------------------------------------------------------

def skip_counter(name: str) -> Any:
    """A named actor that sums skip counts from every Ray Data task of a job (created once, found by name)."""
    import ray

    @ray.remote(num_cpus=0)
    class SkipCounter:
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def add(self, kind: str, n: int = 1) -> None:
            self.counts[kind] = self.counts.get(kind, 0) + n

        def get(self) -> dict[str, int]:
            return dict(self.counts)

    return SkipCounter.options(name=name, get_if_exists=True).remote()


def count_skip(counter: Any, kind: str, n: int, detail: str) -> None:
    log.warning("skipped %d %s: %s", n, kind.replace("_", " "), detail)
    if counter is not None:
        counter.add.remote(kind, n)


# ---- sources ---------------------------------------------------------------------------------------------------

def resolve_files(path: str, fmt: str) -> tuple[list[str], str]:
    """The shard files of `data.path` and their format; errors name the key."""
    if "://" in path:
        return [path], fmt if fmt != "auto" else ("parquet" if path.endswith(".parquet") else "webdataset")
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
    else:
        files = sorted(glob.glob(path))
    by_format = {"webdataset": [f for f in files if f.endswith(".tar")],
                 "parquet": [f for f in files if f.endswith(".parquet")]}
    if fmt == "auto":
        found = [k for k, v in by_format.items() if v]
        if len(found) != 1:
            raise ImageDataError(f"data.path={path}: found {'both tar and parquet' if found else 'no .tar or .parquet'}"
                                 " files; set data.format or point at one kind")
        fmt = found[0]
    if not by_format[fmt]:
        raise ImageDataError(f"data.path={path}: no {'.tar' if fmt == 'webdataset' else '.parquet'} files")
    return by_format[fmt], fmt


def tar_samples(stream: Any, path: str, counter: Any = None) -> Iterator[dict[str, Any]]:
    """Samples of one webdataset shard, in order. A truncated or corrupt shard yields what precedes the damage."""
    current: dict[str, Any] = {}
    read = 0

    def finish(sample: dict[str, Any]) -> dict[str, Any] | None:
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        caption = sample.get("txt")
        if caption is None and "json" in sample:
            meta = json.loads(sample["json"])
            caption = meta.get("caption", meta.get("text"))
        if image is None or caption is None:
            count_skip(counter, "incomplete_samples", 1, f"{path}: sample {sample['key']} lacks an image or caption")
            return None
        text = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)
        return {"key": sample["key"], "image": image, "caption": text}

    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                key, _, ext = base.partition(".")
                key = os.path.join(directory, key)
                if current and key != current["key"]:
                    if (row := finish(current)) is not None:
                        read += 1
                        yield row
                    current = {}
                current["key"] = key
                current[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as e:
        count_skip(counter, "truncated_shards", 1, f"{path} is truncated or corrupt after {read} samples ({e}); "
                                                   "the rest of the shard is skipped")
        return
    if current and (row := finish(current)) is not None:
        yield row


def _tar_datasource(files: list[str], counter: Any) -> Any:
    from ray.data.datasource import FileBasedDatasource

    class TarShards(FileBasedDatasource):
        def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
            import pyarrow as pa

            rows = []
            for row in tar_samples(f, path, counter):
                rows.append(row)
                if len(rows) == 256:
                    yield pa.Table.from_pylist(rows)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows)

    return TarShards(files, file_extensions=["tar"])


def _parquet_rows(batch: dict[str, Any], image_column: str, caption_column: str) -> dict[str, Any]:
    images = [v["bytes"] if isinstance(v, dict) else v for v in batch[image_column]]
    return {"key": [str(k) for k in batch.get("key", range(len(images)))], "image": images,
            "caption": [str(c) for c in batch[caption_column]]}


def _procedural_rows(batch: dict[str, Any], seed: int, world: shapes.WorldConfig) -> dict[str, Any]:
    records = [shapes.sample(int(i), seed, world) for i in batch["id"]]
    return {"key": [r["key"] for r in records], "image": [r["image"] for r in records],
            "caption": [r["caption"] for r in records]}


def procedural(start: int, count: int, seed: int, world: shapes.WorldConfig, labelled: bool = False) -> Any:
    """Records `start .. start+count-1` of the procedural world (captioned, or one-object `labelled` ones) as a
    Ray Dataset, generated in parallel."""
    import ray.data

    blocks = max(1, min(64, count // 256))
    ids = ray.data.range(count, override_num_blocks=blocks).map_batches(lambda b: {"id": b["id"] + start})
    if labelled:
        return ids.map_batches(_labelled_rows, fn_kwargs={"seed": seed, "world": world})
    return ids.map_batches(_procedural_rows, fn_kwargs={"seed": seed, "world": world})


def _labelled_rows(batch: dict[str, Any], seed: int, world: shapes.WorldConfig) -> dict[str, Any]:
    records = [shapes.labelled_sample(int(i), seed, world) for i in batch["id"]]
    return {"key": [r["key"] for r in records], "image": [r["image"] for r in records],
            "label": np.array([r["label"] for r in records], dtype=np.int64)}


def read_records(cfg: ImageTextDataConfig, counter: Any = None) -> Any:
    """Rows `key`, `image` (encoded bytes), `caption` from the configured source."""
    import ray.data

    if cfg.path is None:
        return procedural(0, cfg.samples, cfg.seed, cfg.world)
    files, fmt = resolve_files(cfg.path, cfg.format)
    if fmt == "webdataset":
        return ray.data.read_datasource(_tar_datasource(files, counter))
    check_parquet_columns(files[0], [cfg.image_column, cfg.caption_column])
    return ray.data.read_parquet(files, columns=[cfg.image_column, cfg.caption_column]).map_batches(
        _parquet_rows, fn_kwargs={"image_column": cfg.image_column, "caption_column": cfg.caption_column},
        batch_format="numpy")


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff")


def image_folder_classes(root: str) -> list[str]:
    """The classes of an ImageNet-style folder (`root/<class>/<image>`): its subdirectories, sorted."""
    if not os.path.isdir(root):
        raise ImageDataError(f"data.path={root}: not a directory of class folders")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ImageDataError(f"data.path={root}: {len(classes)} class folder(s); a classifier needs at least 2")
    return classes


def image_folder(root: str, classes: list[str]) -> Any:
    """Rows `key`, `image` (encoded bytes), `label` (index into `classes`) of the image files under
    `root/<class>/`; files that are not images are skipped when decoded, and counted."""
    import ray.data

    index = {name: i for i, name in enumerate(classes)}
    files = ray.data.read_binary_files([os.path.join(root, c) for c in classes], include_paths=True,
                                       file_extensions=list(IMAGE_EXTENSIONS))  # matched case-insensitively
    return files.map_batches(_folder_rows, fn_kwargs={"index": index}, batch_format="numpy")


def _folder_rows(batch: dict[str, Any], index: dict[str, int]) -> dict[str, Any]:
    paths = [str(p) for p in batch["path"]]
    return {"key": paths, "image": list(batch["bytes"]),
            "label": np.array([index[os.path.basename(os.path.dirname(p))] for p in paths], dtype=np.int64)}


def check_parquet_columns(file: str, columns: list[str]) -> None:
    if "://" in file:
        return
    import pyarrow.parquet as pq

    names = pq.read_schema(file).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ImageDataError(f"{file} has no column {missing[0]!r} (columns: {', '.join(names)}); set "
                             f"data.image_column / data.caption_column")


def captions(cfg: ImageTextDataConfig, limit: int | None = None) -> Any:
    """The caption column alone (for the vocabulary count and the CLIP tokenizer)."""
    ds = read_records(cfg).select_columns(["caption"])
    return ds.limit(limit) if limit else ds


# ---- decoding and augmentation ---------------------------------------------------------------------------------

def random_resized_crop_box(width: int, height: int, scale: list[float], ratio: list[float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, right, bottom): area fraction in `scale`, log-uniform aspect ratio in
    `ratio`; after 10 misses, the largest centred box within the ratio range."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def decode(data: bytes, size: int, train: bool, cfg: ImageTextDataConfig, rng: random.Random) -> np.ndarray:
    """Encoded bytes -> uint8 (size, size, 3): random-resized crop + flip for training, centre crop otherwise."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        box = (random_resized_crop_box(*image.size, cfg.crop_scale, cfg.crop_ratio, rng) if train
               else center_box(*image.size))
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if train and cfg.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(image, dtype=np.uint8)


def decode_batch(batch: dict[str, Any], cfg: ImageTextDataConfig, train: bool, counter: Any) -> dict[str, Any]:
    """Rows with encoded `image` -> rows with uint8 `image` (N, S, S, 3); undecodable rows are dropped and counted.
    Augmentation draws come from the OS, so they differ between epochs and runs."""
    rng = random.Random()
    keep, images = [], []
    for i, data in enumerate(batch["image"]):
        try:
            images.append(decode(data, cfg.decode_size if train else cfg.image_size, train, cfg, rng))
            keep.append(i)
        except Exception as e:  # PIL raises many types for bad data; the record is skipped whatever it is
            count_skip(counter, "undecodable_images", 1, f"record {batch['key'][i]}: {type(e).__name__}: {e}")
    out = {k: [v[i] for i in keep] for k, v in batch.items() if k != "image"}
    side = cfg.decode_size if train else cfg.image_size
    out["image"] = np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)
    return out


def decoded(ds: Any, cfg: ImageTextDataConfig, train: bool, counter: Any = None) -> Any:
    """`ds` with its images decoded, cropped (randomly when `train`) and flipped, in Ray Data."""
    return ds.map_batches(decode_batch, fn_kwargs={"cfg": cfg, "train": train, "counter": counter},
                          batch_size=64, batch_format="numpy")


# ---- writing shards (the procedural world; any image-text samples) ------------------------------------------------

def _shard_of(batch: dict[str, Any], seed: int, world: shapes.WorldConfig, out: str) -> dict[str, Any]:
    """Write records `batch["start"][0] .. + batch["count"][0]` as one tar shard, atomically."""
    start, count = int(batch["start"][0]), int(batch["count"][0])
    path = os.path.join(out, f"shard-{start:09d}.tar")
    records = (shapes.sample(index, seed, world) for index in range(start, start + count))
    write_shard(path, ((r["key"], {"png": r["image"], "txt": r["caption"].encode(),
                                   "json": json.dumps(r["scene"]).encode()}) for r in records))
    return {"shard": [path]}


def write_shard(path: str | os.PathLike, samples: Iterator[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {extension: bytes}) samples as one webdataset tar shard (`<key>.<ext>` members), atomically
    (a temporary file renamed into place); returns the number of samples."""
    tmp = f"{path}.tmp"
    n = 0
    with tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            n += 1
    os.replace(tmp, path)
    return n


def write_shapes_shards(out: Any, n: int, start: int, seed: int, world: shapes.WorldConfig,
                        shard_size: int) -> int:
    """Records `start .. start+n-1` of the procedural world as webdataset shards under `out`, one Ray task a
    shard; returns the number of shards."""
    import ray.data

    os.makedirs(out, exist_ok=True)
    starts = list(range(start, start + n, shard_size))
    plan = [{"start": s, "count": min(shard_size, start + n - s)} for s in starts]
    written = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
        _shard_of, batch_size=1, fn_kwargs={"seed": seed, "world": world, "out": str(out)})
    return written.count()
