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
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raytrain.checkpoint import hf
from raytrain.compress import evaluate as ev
from raytrain.compress.format import METHODS, CompressedTensor, compress_tensor, relative_error
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
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', self.name)}@{self.start}-{self.stop}.safetensors"


@dataclass
class EvalConfig:
    text: str | None = None  # .txt or .jsonl of held-out text; None = standard-library docstrings
    text_field: str = "text"
    seq_len: int = 128
    max_tokens: int = 16384
    batch_size: int = 8
    baselines: list[str] = field(default_factory=lambda: ["rtn"])
    tokenizer: str | None = None  # for checkpoints that ship none


def plan(shapes: dict[str, tuple[int, ...]], names: list[str], weights_per_task: int,
         row_alignment: Callable[[int], int] = lambda cols: 1) -> list[Shard]:
    """Row ranges of about `weights_per_task` weights, each starting at a multiple of `row_alignment(cols)` rows."""
    shards = []
    for name in names:
        rows, cols = shapes[name]
        align = row_alignment(cols)
        step = max(1, weights_per_task // cols // align) * align
        shards += [Shard(name, r, min(r + step, rows)) for r in range(0, rows, step)]
    return shards


# ---- the job ---------------------------------------------------------------------------------------------------

@dataclass
class JobPlan:
    """A checked job: what to compress and where its finished row ranges go."""

    source: Path
    out: Path
    method: str
    config: Any
    job: JobConfig
    stored: dict[str, hf.StoredTensor]
    names: list[str]
    shards: list[Shard]

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def manifest(self) -> dict[str, Any]:
        """What a partial directory must match to be resumed."""
        return {"source": str(self.source), "method": self.method, "config": self.config.meta(),
                "shards": [asdict(s) for s in self.shards]}


def plan_job(source: str | Path, out: str | Path, method: str, config: Any, job: JobConfig) -> JobPlan:
    """Check the inputs (no Ray needed) and split the linear weights of `source` into row ranges."""
    source, out = hf.resolve_checkpoint(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise CompressError(f"out={out} already holds files; choose another directory")
    if hf.is_compressed_checkpoint(source):
        raise CompressError(f"checkpoint={source} is already compressed")
    names = hf.linear_weight_names(source)
    if not names:
        raise CompressError(f"checkpoint={source} has no linear layers to compress (no 2-D weight of an nn.Linear "
                            "inside the blocks)")
    if job.weights_per_task < 1:
        raise CompressError(f"job.weights_per_task={job.weights_per_task} must be positive")
    stored = hf.stored_tensors(source)
    try:
        shards = plan({n: stored[n].shape for n in names}, names, job.weights_per_task,
                      lambda cols: METHODS[method].codec.row_alignment(cols, config))
    except ValueError as e:
        raise CompressError(f"checkpoint={source}: {e}") from None
    p = JobPlan(source, out, method, config, job, stored, names, shards)
    if (p.work / MANIFEST).is_file():
        previous = json.loads((p.work / MANIFEST).read_text())
        if previous != p.manifest:
            changed = sorted(k for k in p.manifest if previous.get(k) != p.manifest[k])
            raise CompressError(f"{p.work} holds a job with other {', '.join(changed)}; rerun with the same "
                                "arguments to resume it, or delete it to start over")
    return p


def run_job(p: JobPlan, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the row ranges not yet done on Ray, then write the compressed checkpoint; returns the job summary."""
    started = time.time()
    done = _prepare_work_dir(p)
    todo = [s for s in p.shards if s.file not in done]
    if done:
        log.info("resuming %s: %d of %d row ranges already done", p.work, len(p.shards) - len(todo), len(p.shards))
    _run_tasks(p, todo)
    compressed, errors = _assemble(p)
    dense = {name: _read_stored(t.file, name) for name, t in p.stored.items() if name not in compressed}
    hf.save_compressed(p.out, p.source, dense, compressed, record)
    shutil.rmtree(p.work)
    weights = sum(math.prod(p.stored[n].shape) for n in p.names)
    bits = sum(ct.stored_bytes * 8 for ct in compressed.values()) / weights
    log.info("wrote %s: %d tensors, %.3f bits per weight", p.out, len(compressed), bits)
    return {"checkpoint": str(p.source), "out": str(p.out), "tensors_compressed": len(compressed),
            "weights_compressed": weights, "bits_per_weight": bits,
            "mean_relative_error": sum(errors.values()) / len(errors), "relative_error": errors,
            "row_ranges": len(p.shards), "row_ranges_resumed": len(p.shards) - len(todo),
            "seconds": round(time.time() - started, 3)}


def _prepare_work_dir(p: JobPlan) -> set[str]:
    """Create the partial directory, or reopen one `plan_job` found matching; returns the part files done."""
    parts = p.work / PARTS
    if not (p.work / MANIFEST).is_file():
        parts.mkdir(parents=True, exist_ok=True)
        _write_atomic(p.work / MANIFEST, lambda path: path.write_text(json.dumps(p.manifest, indent=1)))
    for leftover in parts.glob(".tmp-*"):
        leftover.unlink()
    return {f.name for f in parts.glob("*.safetensors")}


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _run_tasks(p: JobPlan, todo: list[Shard]) -> None:
    import ray
    from tqdm import tqdm

    job = p.job
    task = ray.remote(_encode_rows).options(num_cpus=job.cpus_per_task, num_gpus=job.gpus_per_task)
    device = "cuda" if job.gpus_per_task > 0 else "cpu"
    threads = max(1, int(job.cpus_per_task))
    resources = ray.cluster_resources()
    slots = resources.get("GPU", 0) / job.gpus_per_task if job.gpus_per_task else \
        resources.get("CPU", 1) / job.cpus_per_task
    limit = job.max_in_flight or max(1, int(2 * slots))
    total = len(p.shards)
    pending: dict[Any, Shard] = {}
    queue = list(todo)
    bar = tqdm(total=total, initial=total - len(todo), unit="range", file=sys.stderr,
               disable=not sys.stderr.isatty())
    finished, weights_done, started, last_log = total - len(todo), 0, time.time(), time.time()
    while queue or pending:
        while queue and len(pending) < limit:
            shard = queue.pop(0)
            rows = _read_stored(p.stored[shard.name].file, shard.name, shard.start, shard.stop)
            pending[task.remote(rows, p.method, p.config, device, threads)] = shard
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(ready[0])
        codes, sq_err, sq_norm = ray.get(ready[0])
        meta = {"sq_err": repr(sq_err), "sq_norm": repr(sq_norm)}
        _write_atomic(p.work / PARTS / shard.file, lambda path: save_file(codes, str(path), metadata=meta))
        finished += 1
        weights_done += (shard.stop - shard.start) * p.stored[shard.name].shape[1]
        bar.update(1)
        if time.time() - last_log > 10 or not (queue or pending):
            rate = weights_done / max(time.time() - started, 1e-9)
            log.info("compressed %d/%d row ranges (%s rows %d-%d), %.0f weights/s", finished, total, shard.name,
                     shard.start, shard.stop, rate)
            last_log = time.time()
    bar.close()


def _read_stored(file: Path, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    """Rows start:stop of one stored tensor (all of it by default), read without loading the rest of the file."""
    with safe_open(str(file), framework="pt") as st:
        return st.get_slice(name)[start:stop] if start is not None else st.get_tensor(name)


def _encode_rows(rows: torch.Tensor, method: str, config: Any, device: str, threads: int
                 ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Ray task: codes of a row range and its squared error / squared norm (float64)."""
    torch.set_num_threads(threads)
    codec = METHODS[method].codec
    codes = codec.encode(rows, config, device)
    approx = codec.decode(codes, config, rows.shape[1])
    w = rows.double()
    return codes, float((w - approx.double()).square().sum()), float(w.square().sum())


def _assemble(p: JobPlan) -> tuple[dict[str, CompressedTensor], dict[str, float]]:
    """Concatenate each tensor's parts (in row order) into a CompressedTensor; relative error per tensor."""
    compressed, errors = {}, {}
    for name in p.names:
        loaded, sq_err, sq_norm = [], 0.0, 0.0
        for s in (s for s in p.shards if s.name == name):
            path = p.work / PARTS / s.file
            with safe_open(str(path), framework="pt") as st:
                meta = st.metadata()
            sq_err, sq_norm = sq_err + float(meta["sq_err"]), sq_norm + float(meta["sq_norm"])
            loaded.append(load_file(str(path)))
        codes = {k: torch.cat([part[k] for part in loaded]) for k in loaded[0]}
        stored = p.stored[name]
        compressed[name] = CompressedTensor.from_codes(p.method, p.config, codes, stored.shape, stored.dtype)
        errors[name] = math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0
    return compressed, errors


# ---- evaluation ------------------------------------------------------------------------------------------------

def evaluate(source: str | Path, out: str | Path, method: str, configs: dict[str, Any], cfg: EvalConfig,
             windows: torch.Tensor, device: str = "cpu") -> dict[str, Any]:
    """FP vs the compressed checkpoint vs in-process baselines at the same bits: bits per weight, per-tensor
    relative error and perplexity on `windows` (from `heldout_windows`), as one mapping."""
    source, out = hf.resolve_checkpoint(source), hf.resolve_checkpoint(out)
    original = hf.read_weights(source)
    names = hf.linear_weight_names(source)
    weights = sum(original[n].numel() for n in names)
    variants = {method: hf.read_tensors(out)[1]}
    for baseline in cfg.baselines:
        if baseline not in variants:
            variants[baseline] = {n: compress_tensor(original[n], baseline, configs[baseline], device) for n in names}
    model, logits, vocab = _causal_lm(source, device)
    if int(windows.max()) >= vocab:
        raise CompressError(f"the evaluation tokens go up to id {int(windows.max())}, beyond the model's "
                            f"vocabulary of {vocab}")
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
             ", ".join(f"{k} {v['perplexity']:.3f} ({v['bits_per_weight']:.3f} bits per weight)"
                       for k, v in results.items()))
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
    to_model = hf.parameter_names(source)
    params = {n: model.get_parameter(to_model(n)) for n in dense}
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        try:
            for n, p in params.items():
                p.copy_(dense[n])
            yield
        finally:
            for n, p in params.items():
                p.copy_(saved[n])


def heldout_windows(source: str | Path, cfg: EvalConfig) -> torch.Tensor:
    """The evaluation text tokenized with the checkpoint's tokenizer (or `cfg.tokenizer`), cut into windows."""
    from raytrain.data.corpus import heldout_documents
    from raytrain.data.tokenizer import load_tokenizer

    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else hf.resolve_checkpoint(source)
    if not (tok_dir / "tokenizer.json").is_file():
        raise CompressError(f"{tok_dir} has no tokenizer.json; pass evaluation.tokenizer=DIR for eval=true")
    tokenizer = load_tokenizer(tok_dir)
    docs = _read_text(cfg) if cfg.text else heldout_documents()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    try:
        return ev.token_windows((bos + tokenizer.encode(d, add_special_tokens=False) for d in docs), cfg.seq_len,
                                cfg.max_tokens)
    except ValueError as e:
        raise CompressError(f"evaluation.text: {e}") from None


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
