"""CtrlSynth on Ray Data (spec 3.3): read pairs, then actor pools for the models and tasks for the CPU steps,

    read (one task per input shard) -> Decompose (tagger actors) -> control (tasks) -> RecomposeText (LLM actors)
    -> filter_text (tasks) -> RecomposeImage (T2I + tagger actors) -> driver: one output shard per input shard

and the outputs, under `out`:

    <shard>/pairs.tar        webdataset: <key>.png (real or synthetic image), <key>.txt, <key>.json (provenance)
    <shard>/_SUCCESS.json    input path, stage versions, config hash, counts; written last
    errors.jsonl             this run's dropped records and rejected candidates, with reasons

An output shard is written (atomically, records sorted by key, so the bytes do not depend on the order rows
arrive) once every record of its input shard has come through; a rerun skips shards with a manifest of the same
config hash, so a killed run resumes where it stopped and writes the same bytes. With `dedupe` (spec trap 11) a
candidate whose image already has its caption, case, punctuation and spacing aside (the real pair's, or an earlier
path's: SP2 restating SP1 on the same real image), is rejected as `duplicate`; the summary reports the distinct share
of the kept captions (`distinct_caption_ratio`, distinct within each shard).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raytrain.data import imagetext
from raytrain.pipelines.common import (Provenance, RecordResult, config_hash, finish, is_finished, summarize)
from raytrain.pipelines.ctrlsynth import synthesize
from raytrain.pipelines.ctrlsynth.config import IMAGE_PATHS, SynthConfig
from raytrain.pipelines.ctrlsynth.llm import build_writer
from raytrain.pipelines.ctrlsynth.t2i import build_t2i
from raytrain.pipelines.ctrlsynth.tagger import TAGGER_VERSION, build_tagger
from raytrain.pipelines.ctrlsynth.tags import NORMALIZER_VERSION, Tags

log = logging.getLogger("raytrain")
STAGE_VERSIONS = {"tagger": TAGGER_VERSION, "normalizer": NORMALIZER_VERSION, "policy": "ops-1",
                  "prompt": "template-2.5-oneshot-1", "filters": "coverage-1"}


# ---- reading: one task per input shard, every row knows how many records its shard has ------------------------

def shard_id(path: str, root: str) -> str:
    rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    return rel.rsplit(".", 1)[0].replace(os.sep, "__")


def _file_records(path: str, fmt: str, data: imagetext.ImageTextDataConfig, counter: Any) -> list[dict[str, Any]]:
    if fmt == "webdataset":
        with open(path, "rb") as f:
            return list(imagetext.tar_samples(f, path, counter))
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[data.image_column, data.caption_column]).to_pydict()
    rows = imagetext._parquet_rows(table, data.image_column, data.caption_column)
    return [{"key": k, "image": i, "caption": c} for k, i, c in zip(rows["key"], rows["image"], rows["caption"])]


def read_pairs(files: list[str], fmt: str, data: imagetext.ImageTextDataConfig, counter: Any, cpus: float) -> Any:
    import pyarrow as pa
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PairShards(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(os.path.getsize(f) for f in files)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            def read(index: int) -> Iterator[pa.Table]:
                records = _file_records(files[index], fmt, data, counter)
                if records:
                    yield pa.Table.from_pylist([{**r, "file": index, "file_records": len(records)} for r in records])

            return [ReadTask(lambda i=i: read(i), BlockMetadata(num_rows=None, size_bytes=os.path.getsize(f),
                                                                input_files=[f], exec_stats=None),
                             per_task_row_limit=per_task_row_limit) for i, f in enumerate(files)]

    return ray.data.read_datasource(PairShards(), override_num_blocks=max(1, len(files)),
                                    num_cpus=cpus)


# ---- stages ----------------------------------------------------------------------------------------------------

def _rows(batch: dict[str, Any]) -> int:
    return len(batch["key"])


class Decompose:
    """Tagger actor: source tags of each record."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.tagger = build_tagger(cfg.tagger)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        states = []
        for image in batch["image"]:
            state = synthesize.new_state()
            synthesize.decompose(state, image, self.tagger)
            states.append(json.dumps(state))
        return {**batch, "state": states}


def control_batch(batch: dict[str, Any], cfg: SynthConfig) -> dict[str, Any]:
    states = []
    for key, caption, raw in zip(batch["key"], batch["caption"], batch["state"]):
        state = json.loads(raw)
        synthesize.control(state, str(key), str(caption), cfg)
        states.append(json.dumps(state))
    return {**batch, "state": states}


class RecomposeText:
    """LLM actor: the batch's captions, decoded together."""

    def __init__(self, cfg: SynthConfig) -> None:
        import torch

        torch.set_num_threads(cfg.llm.threads)
        self.cfg = cfg
        self.writer = build_writer(cfg.llm)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        states = [json.loads(s) for s in batch["state"]]
        synthesize.recompose_text(states, self.writer, self.cfg)
        return {**batch, "state": [json.dumps(s) for s in states]}


def filter_text_batch(batch: dict[str, Any], cfg: SynthConfig) -> dict[str, Any]:
    states = []
    for raw in batch["state"]:
        state = json.loads(raw)
        synthesize.filter_text(state, cfg)
        states.append(json.dumps(state))
    return {**batch, "state": states}


class RecomposeImage:
    """T2I actor with its own tagger for the image filter."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.t2i = build_t2i(cfg.t2i)
        self.tagger = build_tagger(cfg.tagger)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        states, images = [], {p: [] for p in IMAGE_PATHS}
        for raw in batch["state"]:
            state = json.loads(raw)
            drawn = synthesize.recompose_image(state, self.t2i, self.tagger, self.cfg)
            states.append(json.dumps(state))
            for p in IMAGE_PATHS:
                images[p].append(drawn.get(p, b""))
        return {**batch, "state": states, **{f"image_{p}": images[p] for p in IMAGE_PATHS}}


def pipeline(ds: Any, cfg: SynthConfig) -> Any:
    import ray.data

    pool, b = cfg.pool, cfg.pool.batch_size

    def actors(n: int, gpus: float = 0.0) -> dict[str, Any]:
        return {"compute": ray.data.ActorPoolStrategy(size=n), "num_cpus": pool.cpus, "num_gpus": gpus,
                "batch_size": b, "fn_constructor_kwargs": {"cfg": cfg}}

    tasks = {"fn_kwargs": {"cfg": cfg}, "batch_size": b, "num_cpus": pool.cpus}
    return (ds.map_batches(Decompose, **actors(pool.taggers))
            .map_batches(control_batch, **tasks)
            .map_batches(RecomposeText, **actors(pool.llms, pool.llm_gpus))
            .map_batches(filter_text_batch, **tasks)
            .map_batches(RecomposeImage, **actors(pool.t2i)))


# ---- writing ---------------------------------------------------------------------------------------------------

def _ext(image: bytes) -> str:
    return "png" if image[:8] == b"\x89PNG\r\n\x1a\n" else "jpg" if image[:3] == b"\xff\xd8\xff" else "webp"


def shard_samples(rows: list[dict[str, Any]], cfg: SynthConfig, source: str,
                  models: dict[str, str]) -> tuple[list[tuple[str, dict[str, bytes]]], dict[str, Any],
                                                   list[dict[str, Any]]]:
    """The samples of one output shard (sorted by source key, then path), its counts and its problems."""
    samples, problems, captions = [], [], set()
    counts: dict[str, Any] = {"records": len(rows), "dropped": Counter(), "accepted": Counter(),
                              "rejected": defaultdict(Counter)}
    for row in sorted(rows, key=lambda r: str(r["key"])):
        key, state = str(row["key"]), json.loads(row["state"])
        if state["error"]:
            reason = state["error"]
            counts["dropped"][reason.split(":")[0]] += 1
            problems.append({"where": key, "reason": reason})
            continue
        pairs = {(key, caption_key(str(row["caption"])))}  # (image, caption) of the real pair and those kept
        for cand in state["candidates"]:
            path = cand["path"]
            pair = (f"{key}/{path}" if path in IMAGE_PATHS else key, caption_key(cand["caption"]))
            if cand["status"] == "accepted" and cfg.dedupe and pair in pairs:
                cand = {**cand, "status": "rejected", "reason": "duplicate: this image already has this caption"}
            if cand["status"] != "accepted":
                counts["rejected"][path][cand["reason"].split(":")[0]] += 1
                problems.append({"where": f"{key}/{path}", "reason": cand["reason"]})
                continue
            pairs.add(pair)
            captions.add(pair[1])
            counts["accepted"][path] += 1
            image = row[f"image_{path}"] if path in IMAGE_PATHS else row["image"]
            provenance = {"source_id": key, "source_file": source, "path": path, "policy": cfg.policy,
                          "caption": cand["caption"], "original_caption": str(row["caption"]),
                          "source_tags": Tags.from_json(state["tags"]).readable(),
                          "tags": Tags.from_json(cand["required"]).readable(), "edits": cand["edits"],
                          "forbidden": cand["forbidden"], "scores": cand.get("scores", {}), "seeds": cand["seeds"],
                          "prompt_hash": cand.get("prompt_hash"), "image_prompt": cand.get("image_prompt"),
                          "models": models, "normalizer": NORMALIZER_VERSION}
            name = f"{key.replace('/', '_').replace('.', '_')}_{path.lower()}"
            samples.append((name, {_ext(image): image, "txt": cand["caption"].encode(),
                                   "json": json.dumps(provenance, sort_keys=True).encode()}))
    counts = {**counts, "pairs": len(samples), "distinct_captions": len(captions),
              "dropped": dict(counts["dropped"]),
              "accepted": dict(counts["accepted"]), "rejected": {p: dict(c) for p, c in counts["rejected"].items()}}
    return samples, counts, problems


def caption_key(caption: str) -> str:
    """A caption with case, punctuation and spacing set aside: near-exact duplicates share it (trap 11)."""
    return " ".join(re.findall(r"[a-z0-9]+", caption.lower()))


def write_output_shard(out: Path, sid: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    (out / sid).mkdir(parents=True, exist_ok=True)
    imagetext.write_shard(out / sid / "pairs.tar", iter(samples))


# ---- driver ----------------------------------------------------------------------------------------------------

def models_of(cfg: SynthConfig) -> dict[str, str]:
    llm = f"engine:{cfg.llm.checkpoint}" if cfg.llm.backend == "engine" else "template-1"
    return {"tagger": tagger_version(cfg), "llm": llm, "t2i": cfg.t2i.backend}


def tagger_version(cfg: SynthConfig) -> str:
    """The template tagger's version, or a trained one's with the hash of its weights (and settings)."""
    if cfg.tagger.kind == "templates":
        return TAGGER_VERSION
    return build_tagger(cfg.tagger).version


def run(cfg: SynthConfig, data: imagetext.ImageTextDataConfig, out: str) -> dict[str, Any]:
    """Synthesize pairs from every unfinished input shard of `data.path` into `out`; returns the summary."""
    import ray.data

    files, fmt = imagetext.resolve_files(data.path, data.format)
    out_dir = Path(out)
    cfg_hash = config_hash({"synth": asdict(cfg), "format": fmt})
    ids = [shard_id(f, data.path) for f in files]
    skipped = [i for i in ids if is_finished(out_dir, i, cfg_hash)]
    todo = [i for i, sid in enumerate(ids) if sid not in skipped]
    log.info("synth: %d input shards, %d already finished, %d to do", len(files), len(skipped), len(todo))
    counter = imagetext.skip_counter(f"ctrlsynth-skips-{cfg_hash}-{time.time_ns()}")
    models = models_of(cfg)
    results: list[RecordResult] = []
    pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
    start = time.perf_counter()
    records = 0

    def complete(index: int, rows: list[dict[str, Any]]) -> None:
        sid = ids[todo[index]]
        samples, counts, problems = shard_samples(rows, cfg, files[todo[index]], models)
        write_output_shard(out_dir, sid, samples)
        finish(out_dir, Provenance(sid, files[todo[index]], {**STAGE_VERSIONS, **models}, cfg_hash), counts)
        results.append(RecordResult(sid, "done", counts=counts, problems=problems))
        log.info("synth: %s done: %d records -> %d pairs", sid, counts["records"], counts["pairs"])

    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = pipeline(read_pairs([files[i] for i in todo], fmt, data, counter, cfg.pool.cpus), cfg)
        for row in ds.iter_rows():
            index = int(row["file"])
            pending[index].append(row)
            records += 1
            if len(pending[index]) == int(row["file_records"]):
                complete(index, pending.pop(index))
        seen = {r.id for r in results}
        for index, _ in enumerate(todo):
            sid = ids[todo[index]]
            if sid in seen:
                continue
            if index in pending:
                results.append(RecordResult(sid, "failed", "rows of this shard were lost (see the Ray logs)"))
            else:  # nothing readable in it: an empty output shard, so the rerun skips it too
                complete(index, [])
    seconds = time.perf_counter() - start
    summary = summarize(out_dir, results, skipped)
    summary.update(_totals(results), records=records, seconds=round(seconds, 2),
                   records_per_s=round(records / seconds, 3) if records else 0.0,
                   skipped_samples=ray.get(counter.get.remote()), config_hash=cfg_hash, out=str(out_dir))
    return summary


def _totals(results: list[RecordResult]) -> dict[str, Any]:
    accepted, dropped, rejected = Counter(), Counter(), defaultdict(Counter)
    for r in results:
        accepted.update(r.counts.get("accepted", {}))
        dropped.update(r.counts.get("dropped", {}))
        for path, reasons in r.counts.get("rejected", {}).items():
            rejected[path].update(reasons)
    pass_rate = {p: round(accepted[p] / (accepted[p] + sum(rejected[p].values())), 4)
                 for p in sorted(set(accepted) | set(rejected)) if accepted[p] + sum(rejected[p].values())}
    pairs = sum(accepted.values())
    distinct = sum(r.counts.get("distinct_captions", 0) for r in results)
    return {"pairs": pairs, "accepted": dict(accepted), "dropped": dict(dropped),
            "rejected": {p: dict(c) for p, c in rejected.items()}, "pass_rate": pass_rate,
            "distinct_caption_ratio": round(distinct / pairs, 4) if pairs else None}
