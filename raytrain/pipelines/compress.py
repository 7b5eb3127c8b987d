"""The distributed compression job: every linear weight of a checkpoint, in row ranges fanned out over Ray tasks.

A weight of more than `weights_per_task` values is split into row ranges (SeedLM and RTN codes are row-aligned, so
the ranges' codes concatenate). The driver reads each range lazily from the safetensors file and hands it to a Ray
task (1 CPU, or a GPU with `gpus_per_task`); as each task finishes, the driver writes its codes and error sums to
`OUT.partial/parts/` atomically. When every range is done the parts are packed into the compressed checkpoint,
written atomically to OUT, and the partial directory is removed. A killed job rerun with the same arguments skips the
ranges already written; other arguments are refused rather than mixed. `evaluate` measures FP, the compressed
checkpoint and in-process baselines on the same held-out text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raytrain.checkpoint import hf
from raytrain.compress import evaluate as ev
from raytrain.compress.format import METHODS, CompressedTensor, compress_tensor, is_compressed_file, relative_error
from raytrain.config import RaytrainError

log = logging.getLogger("raytrain.compress")
MANIFEST, PARTS = "manifest.json", "parts"


class CompressError(RaytrainError):
    pass


@dataclass
class JobConfig:
    weights_per_task: int = 1 << 20  # weights per Ray task (a large tensor is split into row ranges)
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0  # > 0: tasks run the search on their GPU
    max_in_flight: int | None = None  # tasks submitted at once; None = 2 x the cluster's slots for them


@dataclass(frozen=True)
class Shard:
    name: str
    start: int
    stop: int

    @property
    def file(self) -> str:
        return f"{self.name}@{self.start}-{self.stop}.safetensors"


@dataclass
class EvalConfig:
    text: str | None = None  # .txt or .jsonl of held-out text; None = standard-library docstrings
    text_field: str = "text"
    seq_len: int = 128
    max_tokens: int = 16384
    batch_size: int = 8
    baselines: list[str] = field(default_factory=lambda: ["rtn"])
    tokenizer: str | None = None  # for checkpoints that ship none


def plan(shapes: dict[str, tuple[int, ...]], names: list[str], weights_per_task: int) -> list[Shard]:
    shards = []
    for name in names:
        rows, cols = shapes[name]
        step = max(1, weights_per_task // cols)
        shards += [Shard(name, r, min(r + step, rows)) for r in range(0, rows, step)]
    return shards


# ---- the job ---------------------------------------------------------------------------------------------------

def compress_checkpoint(source: str | Path, out: str | Path, method: str, config: Any, job: JobConfig,
                        record: dict[str, Any]) -> dict[str, Any]:
    """Compress every linear weight of `source` into a checkpoint at `out`; returns the job summary."""
    import ray

    started = time.time()
    source, out = hf.resolve_checkpoint(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise CompressError(f"out={out} already holds files; choose another directory")
    if any(is_compressed_file(f) for f in hf.weight_files(source)):
        raise CompressError(f"checkpoint={source} is already compressed")
    names = hf.linear_weight_names(source)
    if not names:
        raise CompressError(f"checkpoint={source} has no linear layers to compress (no 2-D weight of an nn.Linear "
                            "inside the blocks)")
    stored = hf.stored_tensors(source)
    shards = plan({n: stored[n].shape for n in names}, names, job.weights_per_task)
    work = out.with_name(out.name + ".partial")
    done = _prepare_work_dir(work, {"source": str(source), "method": method, "config": config.meta(),
                                    "shards": [asdict(s) for s in shards]})
    todo = [s for s in shards if s.file not in done]
    if done:
        log.info("resuming %s: %d of %d row ranges already done", work, len(shards) - len(todo), len(shards))
    _run_tasks(stored, work, todo, len(shards), method, config, job)
    compressed, errors = _assemble(work, shards, stored, method, config)
    dense = {k: v for k, v in hf.read_weights(source).items() if k not in compressed}
    hf.save_compressed(out, source, dense, compressed, record)
    shutil.rmtree(work)
    weights = sum(math.prod(stored[n].shape) for n in names)
    bits = sum(ct.stored_bytes * 8 for ct in compressed.values())
    log.info("wrote %s: %d tensors, %.3f bits per weight", out, len(compressed), bits / weights)
    return {"checkpoint": str(source), "out": str(out), "tensors_compressed": len(compressed),
            "weights_compressed": weights, "bits_per_weight": bits / weights,
            "mean_relative_error": sum(errors.values()) / len(errors), "relative_error": errors,
            "row_ranges": len(shards), "row_ranges_resumed": len(shards) - len(todo),
            "seconds": round(time.time() - started, 3)}


def _prepare_work_dir(work: Path, manifest: dict[str, Any]) -> set[str]:
    """Create or reopen the partial directory; returns the part files already complete."""
    parts = work / PARTS
    if (work / MANIFEST).is_file():
        previous = json.loads((work / MANIFEST).read_text())
        if previous != manifest:
            changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
            raise CompressError(f"{work} holds a job with other {', '.join(changed)}; rerun with the same "
                                "arguments to resume it, or delete it to start over")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        _write_atomic(work / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    for leftover in parts.glob(".tmp-*"):
        leftover.unlink()
    return {p.name for p in parts.glob("*.safetensors")}


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _run_tasks(stored: dict[str, hf.StoredTensor], work: Path, todo: list[Shard], total: int, method: str,
               config: Any, job: JobConfig) -> None:
    import ray
    from tqdm import tqdm

    task = ray.remote(_encode_rows).options(num_cpus=job.cpus_per_task, num_gpus=job.gpus_per_task)
    device = "cuda" if job.gpus_per_task > 0 else "cpu"
    threads = max(1, int(job.cpus_per_task))
    resources = ray.cluster_resources()
    slots = resources.get("GPU", 0) / job.gpus_per_task if job.gpus_per_task else \
        resources.get("CPU", 1) / job.cpus_per_task
    limit = job.max_in_flight or max(1, int(2 * slots))
    pending: dict[Any, Shard] = {}
    queue = list(todo)
    bar = tqdm(total=total, initial=total - len(todo), unit="range", file=sys.stderr,
               disable=not sys.stderr.isatty())
    finished, weights_done, started, last_log = total - len(todo), 0, time.time(), time.time()
    while queue or pending:
        while queue and len(pending) < limit:
            shard = queue.pop(0)
            rows = _read_rows(stored[shard.name].file, shard)
            pending[task.remote(rows, method, config, device, threads)] = shard
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(ready[0])
        codes, sq_err, sq_norm = ray.get(ready[0])
        meta = {"sq_err": repr(sq_err), "sq_norm": repr(sq_norm)}
        _write_atomic(work / PARTS / shard.file, lambda p: save_file(codes, str(p), metadata=meta))
        weights_done += (shard.stop - shard.start) * codes[next(iter(codes))].shape[1]
        finished += 1
        bar.update(1)
        if time.time() - last_log > 10 or not (queue or pending):
            rate = weights_done / max(time.time() - started, 1e-9)
            log.info("compressed %d/%d row ranges (%s rows %d-%d), %.0f weights/s", finished, total, shard.name,
                     shard.start, shard.stop, rate)
            last_log = time.time()
    bar.close()


def _read_rows(file: Path, shard: Shard) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as st:
        return st.get_slice(shard.name)[shard.start:shard.stop]


def _encode_rows(rows: torch.Tensor, method: str, config: Any, device: str, threads: int
                 ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Ray task: codes of a row range and its squared error / squared norm (float64)."""
    torch.set_num_threads(threads)
    codec = METHODS[method].codec
    codes = codec.encode(rows, config, device)
    approx = codec.decode(codes, config, rows.shape[1])
    w = rows.double()
    return codes, float((w - approx.double()).square().sum()), float(w.square().sum())


def _assemble(work: Path, shards: list[Shard], stored: dict[str, hf.StoredTensor], method: str, config: Any
              ) -> tuple[dict[str, CompressedTensor], dict[str, float]]:
    """Concatenate each tensor's parts (in row order) into a CompressedTensor; relative error per tensor."""
    by_name: dict[str, list[Shard]] = {}
    for s in shards:
        by_name.setdefault(s.name, []).append(s)
    compressed, errors = {}, {}
    for name, parts in by_name.items():
        loaded, sq_err, sq_norm = [], 0.0, 0.0
        for s in parts:
            path = work / PARTS / s.file
            with safe_open(str(path), framework="pt") as st:
                meta = st.metadata()
            sq_err, sq_norm = sq_err + float(meta["sq_err"]), sq_norm + float(meta["sq_norm"])
            loaded.append(load_file(str(path)))
        codes = {k: torch.cat([p[k] for p in loaded]) for k in loaded[0]}
        compressed[name] = CompressedTensor.from_codes(method, config, codes, stored[name].shape, stored[name].dtype)
        errors[name] = math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0
    return compressed, errors


# ---- evaluation ------------------------------------------------------------------------------------------------

def evaluate(source: str | Path, out: str | Path, method: str, configs: dict[str, Any], cfg: EvalConfig,
             device: str = "cpu") -> dict[str, Any]:
    """FP vs the compressed checkpoint vs in-process baselines at the same bits: bits per weight, per-tensor
    relative error and held-out perplexity, as one mapping."""
    source, out = hf.resolve_checkpoint(source), hf.resolve_checkpoint(out)
    original = hf.read_weights(source)
    names = hf.linear_weight_names(source)
    weights = sum(original[n].numel() for n in names)
    variants = {method: hf.read_tensors(out)[1]}
    for baseline in cfg.baselines:
        if baseline not in variants:
            variants[baseline] = {n: compress_tensor(original[n], baseline, configs[baseline], device) for n in names}
    model, logits, vocab = _causal_lm(source, device)
    windows = _heldout_windows(source, cfg, vocab)
    results = {"fp": {"bits_per_weight": float(original[names[0]].element_size() * 8),
                      "perplexity": ev.perplexity(logits, windows, vocab, cfg.batch_size, device)}}
    for name, tensors in variants.items():
        dense = {n: ct.dense() for n, ct in tensors.items()}  # for the written checkpoint: what read_weights gives
        errors = {n: relative_error(original[n], dense[n]) for n in names}
        with _weights_swapped(model, source, dense):
            ppl = ev.perplexity(logits, windows, vocab, cfg.batch_size, device)
        results[name] = {"bits_per_weight": sum(ct.stored_bytes * 8 for ct in tensors.values()) / weights,
                         "mean_relative_error": sum(errors.values()) / len(errors), "perplexity": ppl,
                         "relative_error": errors}
    log.info("perplexity on %d held-out tokens: %s", windows[:, 1:].numel(),
             ", ".join(f"{k} {v['perplexity']:.3f}" for k, v in results.items()))
    return {"eval_tokens": windows[:, 1:].numel(), "results": results}


def _causal_lm(source: Path, device: str) -> tuple[torch.nn.Module, ev.LogitsFn, int]:
    """The source checkpoint's model, a logits function over it and its vocabulary size."""
    if hf.is_raytrain_layout(source):
        model = hf.load_pretrained(source, device=device).model
        return model, model, model.cfg.vocab_size
    model = hf.load_hf_causal_lm(source, device=device)
    return model, lambda tokens: model(input_ids=tokens).logits, model.config.vocab_size


@contextlib.contextmanager
def _weights_swapped(model: torch.nn.Module, source: Path, dense: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily copy `dense` (stored names) into the model's parameters."""
    params = {n: model.get_parameter(hf.model_parameter_name(source, n)) for n in dense}
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        try:
            for n, p in params.items():
                p.copy_(dense[n])
            yield
        finally:
            for n, p in params.items():
                p.copy_(saved[n])


def _heldout_windows(source: Path, cfg: EvalConfig, vocab: int) -> torch.Tensor:
    from raytrain.data.corpus import heldout_documents
    from raytrain.data.tokenizer import load_tokenizer

    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else source
    if not (tok_dir / "tokenizer.json").is_file():
        raise CompressError(f"{tok_dir} has no tokenizer.json; pass evaluation.tokenizer=DIR for eval=true")
    tokenizer = load_tokenizer(tok_dir)
    docs = _read_text(cfg) if cfg.text else heldout_documents()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    try:
        windows = ev.token_windows((bos + tokenizer.encode(d, add_special_tokens=False) for d in docs),
                                   cfg.seq_len, cfg.max_tokens)
    except ValueError as e:
        raise CompressError(f"evaluation.text: {e}") from None
    if int(windows.max()) >= vocab:
        raise CompressError(f"the tokenizer of {tok_dir} yields ids up to {int(windows.max())}, beyond the "
                            f"model's vocabulary of {vocab}")
    return windows


def _read_text(cfg: EvalConfig) -> list[str]:
    path = Path(cfg.text)
    if not path.is_file():
        raise CompressError(f"evaluation.text={path}: no such file")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)[cfg.text_field] for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompressError(f"evaluation.text={path}: a line without a {cfg.text_field!r} field ({e})") from None
    return [path.read_text()]
