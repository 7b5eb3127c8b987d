"""Auto-labeling on Ray Data: one task per sequence, its frames streamed, its outputs written per frame.

Layout of `out`:

    <seq>/labels/000000.json     per frame: boxes (vehicle frame), track ids, labels, scores, moving flags, problems
    <seq>/features/000000.npz    per frame (mode full): `points_index` (M,) non-ground points of the frame,
                                 `visible` (M,), `features` (V, D) fp16 for the visible ones, `ground_plane` (4,)
    <seq>/_SUCCESS.json          provenance (input id and path, stage versions, config hash) and counts; written last
    errors.jsonl                 this run's failed sequences and skipped frames, with reasons

Every file is written atomically. A rerun skips sequences whose manifest exists with the same config hash; a
sequence that failed, or whose task died, is redone from scratch (tracking needs the whole sequence). A failing
sequence (bad metadata, one frame, an exception in a stage) is reported and counted; the others go on.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raytrain.data.lidar import LidarFormatError, Sequence, find_sequences
from raytrain.pipelines.autolabel.config import AutolabelConfig
from raytrain.pipelines.autolabel.label import Prompts
from raytrain.pipelines.autolabel.pipeline import PreparedFrame, SequenceLabeler
from raytrain.pipelines.autolabel.vlm import build_vlm
from raytrain.pipelines.common import (Provenance, RecordResult, config_hash, finish, is_finished, summarize,
                                       write_json, write_npz)

log = logging.getLogger("raytrain")

STAGE_VERSIONS = {"ground": "ransac-1", "motion": "entropy-1", "features": "project-1", "cluster": "filters-1",
                  "track": "kalman-greedy-1", "boxes": "amodal-1", "label": "cosine-softmax-1"}

_MODELS: dict[str, Any] = {}  # per worker process: Ray reuses workers across tasks


def _labeler(cfg: AutolabelConfig) -> SequenceLabeler:
    if cfg.mode != "full":
        return SequenceLabeler(cfg, None, None)
    key = repr(cfg.vlm)
    if key not in _MODELS:
        _MODELS[key] = build_vlm(cfg.vlm)
    model = _MODELS[key]
    return SequenceLabeler(cfg, model, Prompts.encode(model, cfg.label))


def label_sequence(path: str, cfg: AutolabelConfig, out: Path, cfg_hash: str) -> RecordResult:
    """Label one sequence into `out/<id>/`; never raises."""
    seq_id = Path(path).name
    try:
        seq = Sequence(path)
        if seq.num_frames < cfg.min_frames:
            return RecordResult(seq_id, "failed", f"the sequence has {seq.num_frames} frame(s); the motion cue and "
                                f"tracking need at least min_frames={cfg.min_frames}")
        root = Path(out) / seq_id
        start = time.perf_counter()

        def save_features(p: PreparedFrame) -> None:
            if cfg.save_features and p.features is not None:
                write_npz(root / "features" / f"{p.frame.index:06d}.npz", points_index=p.nonground.astype(np.int32),
                          visible=p.visible, features=p.features[p.visible].astype(np.float16),
                          ground_plane=p.plane)

        result = _labeler(cfg).run(seq, on_frame=save_features)
        for frame in result.frames:
            write_json(root / "labels" / f"{frame.index:06d}.json", frame.to_json())
        counts = {"frames": len(result.frames), "tracks": result.tracks,
                  "boxes": sum(len(f.boxes) for f in result.frames), "seconds": round(time.perf_counter() - start, 2),
                  "problems": dict(result.problems)}
        finish(out, Provenance(seq_id, str(path), STAGE_VERSIONS, cfg_hash), counts)
        problems = [{"frame": f.index, "reason": p} for f in result.frames for p in f.problems]
        return RecordResult(seq_id, "done", counts=counts, problems=problems)
    except LidarFormatError as e:
        return RecordResult(seq_id, "failed", str(e))
    except Exception as e:  # one sequence's bug or bad data must not end the job
        log.error("sequence %s failed:\n%s", seq_id, traceback.format_exc())
        return RecordResult(seq_id, "failed", f"{type(e).__name__}: {e}")


def _task(row: dict[str, Any], cfg: AutolabelConfig, out: str, cfg_hash: str, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return label_sequence(row["path"], cfg, Path(out), cfg_hash).to_row()


def read_sequences(paths: list[Path]) -> Any:
    """A Ray Dataset with one row per sequence ({"id", "path"}), one read task and block per sequence.

    A datasource read (not `from_items`), so the plan starts at a read as Ray Data's checkpointing requires; the
    frames themselves are streamed inside the task that labels the sequence.
    """
    return ray.data.read_datasource(SequenceDatasource(paths), override_num_blocks=max(1, len(paths)))


class SequenceDatasource(Datasource):
    """Lists sequences; each read task yields one row naming one sequence."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self.paths = [str(p) for p in paths]

    def estimate_inmemory_data_size(self) -> int:
        return sum(len(p) + 64 for p in self.paths)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        def read(path: str) -> list[pa.Table]:
            return [pa.table({"id": [Path(path).name], "path": [path]})]

        return [ReadTask(lambda p=p: read(p), BlockMetadata(num_rows=1, size_bytes=len(p) + 64, input_files=[p],
                                                             exec_stats=None), per_task_row_limit=per_task_row_limit)
                for p in self.paths]


def run(cfg: AutolabelConfig, data_path: str, out: str, workers: int, cpus_per_task: float = 1.0) -> dict[str, Any]:
    """Label every unfinished sequence under `data_path` into `out` with `workers` concurrent tasks."""
    paths = find_sequences(data_path)
    cfg_hash = config_hash(asdict(cfg))
    skipped = [p.name for p in paths if is_finished(Path(out), p.name, cfg_hash)]
    todo = [p for p in paths if p.name not in skipped]
    log.info("autolabel: %d sequences, %d already finished, %d to label with %d workers", len(paths), len(skipped),
             len(todo), workers)
    results: list[RecordResult] = []
    start = time.perf_counter()
    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        saved = ctx.max_errored_blocks
        ctx.max_errored_blocks = len(todo)  # a task that dies (OOM, segfault) loses its sequence, not the job
        try:
            ds = read_sequences(todo).map(
                _task, fn_kwargs={"cfg": cfg, "out": str(out), "cfg_hash": cfg_hash,
                                  "threads": max(1, int(cpus_per_task))},
                num_cpus=cpus_per_task, compute=ray.data.TaskPoolStrategy(size=workers))
            for row in ds.iter_rows():
                r = RecordResult.from_row(row)
                results.append(r)
                log.info("%s %s %s", r.id, r.status, r.reason or r.counts)
        finally:
            ctx.max_errored_blocks = saved
        lost = {p.name for p in todo} - {r.id for r in results}
        results += [RecordResult(i, "failed", "its task died (see the Ray worker logs)") for i in sorted(lost)]
    summary = summarize(Path(out), results, skipped)
    frames = sum(r.counts.get("frames", 0) for r in results)
    summary.update(sequences=len(paths), frames=frames, seconds=round(time.perf_counter() - start, 2),
                   config_hash=cfg_hash, out=str(out), workers=workers)
    os.makedirs(out, exist_ok=True)
    return summary
