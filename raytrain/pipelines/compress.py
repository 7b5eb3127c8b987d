"""The distributed compression job: every linear weight of a checkpoint, in row ranges fanned out over Ray tasks.

A weight of more than `weights_per_task` values is split into row ranges (SeedLM, RTN and palettization codes are
row-aligned, palettization's on its row groups, so the ranges' codes concatenate). The driver reads each range
lazily from the safetensors file and hands it to a Ray task (1 CPU, or a GPU with `gpus_per_task`); as each task
finishes, the driver writes its codes and error sums to `OUT.partial/parts/` atomically. When every range is done
the parts are packed into the compressed checkpoint, written atomically to OUT, and the partial directory is
removed. A killed job rerun with the same arguments skips the ranges already written; other arguments are refused
rather than mixed. `evaluate` measures FP, the compressed checkpoint and in-process baselines on the same held-out
text.

A tensor may have several candidate encodings (mixed palettization: 4 and 2 bits). Each task then encodes its rows
both ways and returns each one's cost: the squared error, or weighted by the squared gradients of the LM loss on
calibration text (a diagonal empirical Fisher, computed once by one Ray task and kept in `OUT.partial/`), the
second-order estimate of the loss increase. When every range is done, `palettize.allocate` picks each tensor's
encoding for the target bits per weight, and only the chosen codes are packed. The embedding table may be
compressed too (AFM: 8-bit integers, one scale per row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raytrain.checkpoint import hf
from raytrain.compress import evaluate as ev
from raytrain.compress import palettize
from raytrain.compress.format import METHODS, CompressedTensor, compress_tensor, relative_error
from raytrain.config import RaytrainError

log = logging.getLogger("raytrain.compress")
MANIFEST, PARTS, FISHER = "manifest.json", "parts", "fisher.safetensors"
IMPORTANCE = ("fisher", "error")


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


@dataclass(frozen=True)
class Encoding:
    """One way to encode a tensor: a codec and its config."""

    method: str
    config: Any

    def meta(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config.meta()}

    def row_alignment(self, cols: int) -> int:
        return METHODS[self.method].codec.row_alignment(cols, self.config)


@dataclass
class MixedConfig:
    """Mixed palettization: each linear weight at one of `bits`, averaging at most `target_bpw` (tables counted)."""

    target_bpw: float = 3.5
    bits: list[int] = field(default_factory=lambda: [4, 2])
    importance: str = "fisher"  # fisher: squared error weighted by squared LM-loss gradients | error: plain
    calibration: str = "embedded:prose"  # text for the gradients: embedded:<source>, .txt or .jsonl
    calibration_tokens: int = 8192
    seq_len: int = 128
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance={self.importance!r}; expected one of {', '.join(IMPORTANCE)}")
        if len(set(self.bits)) < 2:
            raise ValueError(f"bits={self.bits}: a mix needs at least two widths")


@dataclass
class EvalConfig:
    text: str | None = None  # .txt or .jsonl of held-out text; None = standard-library docstrings
    text_field: str = "text"
    seq_len: int = 128
    max_tokens: int = 16384
    batch_size: int = 8
    baselines: list[str] = field(default_factory=lambda: ["rtn"])
    tokenizer: str | None = None  # for checkpoints that ship none


def plan(shapes: dict[str, tuple[int, ...]], alignments: dict[str, int], weights_per_task: int) -> list[Shard]:
    """Row ranges of about `weights_per_task` weights, each starting on a multiple of its tensor's alignment."""
    shards = []
    for name, align in alignments.items():
        rows, cols = shapes[name]
        step = max(1, weights_per_task // cols // align) * align
        shards += [Shard(name, r, min(r + step, rows)) for r in range(0, rows, step)]
    return shards


# ---- the job ---------------------------------------------------------------------------------------------------

@dataclass
class JobPlan:
    """A checked job: what to compress, how, and where its finished row ranges go."""

    source: Path
    out: Path
    method: str
    config: Any
    job: JobConfig
    stored: dict[str, hf.StoredTensor]
    names: list[str]  # the linear weights
    encodings: dict[str, list[Encoding]]  # every compressed tensor's candidates (one unless mixed)
    shards: list[Shard]
    embedding: Encoding | None = None
    mixed: MixedConfig | None = None
    calibration: torch.Tensor | None = None  # token windows for the squared gradients (mixed, importance=fisher)

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def manifest(self) -> dict[str, Any]:
        """What a partial directory must match to be resumed."""
        return {"source": str(self.source), "method": self.method, "config": self.config.meta(),
                "embedding": self.embedding.meta() if self.embedding else None,
                "mixed": asdict(self.mixed) if self.mixed else None, "shards": [asdict(s) for s in self.shards]}


def plan_job(source: str | Path, out: str | Path, method: str, config: Any, job: JobConfig,
             embedding: Encoding | None = None, mixed: MixedConfig | None = None) -> JobPlan:
    """Check the inputs (no Ray needed) and split the tensors to compress into row ranges. `embedding` also
    compresses the token embedding tables; `mixed` gives each linear weight palettize candidates at `mixed.bits`
    (`config` is then the palettize config of the widest)."""
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
    if mixed is not None:
        candidates = [Encoding("palettize", dataclasses.replace(config, bits=b)) for b in sorted(mixed.bits)[::-1]]
    else:
        candidates = [Encoding(method, config)]
    encodings = {n: candidates for n in names}
    if embedding is not None:
        for name in hf.embedding_weight_names(source):  # one scale per row: the group is the whole row
            cfg = dataclasses.replace(embedding.config, group_size=stored[name].shape[1])
            encodings[name] = [Encoding(embedding.method, cfg)]
    try:
        alignments = {n: max(e.row_alignment(stored[n].shape[1]) for e in encs) for n, encs in encodings.items()}
    except ValueError as e:
        raise CompressError(f"checkpoint={source}: {e}") from None
    shards = plan({n: stored[n].shape for n in encodings}, alignments, job.weights_per_task)
    calibration = None
    if mixed is not None:
        narrowest = dataclasses.replace(config, bits=min(mixed.bits))
        weights = sum(math.prod(stored[n].shape) for n in names)
        least = sum(palettize.stored_bits(stored[n].shape, narrowest) for n in names) / weights
        if least > mixed.target_bpw:
            raise CompressError(f"target_bpw={mixed.target_bpw}: the narrowest setting already needs {least:.4f} "
                                "bits per weight")
    if mixed is not None and mixed.importance == "fisher":
        text = EvalConfig(text=mixed.calibration, seq_len=mixed.seq_len, max_tokens=mixed.calibration_tokens)
        calibration = heldout_windows(source, text, key="palettize.calibration")
    p = JobPlan(source, out, method, config, job, stored, names, encodings, shards, embedding, mixed, calibration)
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
    if p.calibration is not None and not (p.work / FISHER).is_file():
        _run_fisher(p)
    _run_tasks(p, todo)
    compressed, errors, chosen = _assemble(p)
    weights = sum(math.prod(p.stored[n].shape) for n in p.names)
    bits = {"bits_per_weight": sum(compressed[n].stored_bytes * 8 for n in p.names) / weights}  # linear weights
    embedded = [n for n in compressed if n not in p.names]
    if embedded:
        bits["embedding_bits_per_weight"] = sum(compressed[n].stored_bytes * 8 for n in embedded) / sum(
            math.prod(p.stored[n].shape) for n in embedded)
    dense = {name: _read_stored(t.file, name) for name, t in p.stored.items() if name not in compressed}
    hf.save_compressed(p.out, p.source, dense, compressed, {**(record or {}), **bits, **_allocation(p, chosen)})
    shutil.rmtree(p.work)
    log.info("wrote %s: %d tensors, %.4f bits per linear weight", p.out, len(compressed), bits["bits_per_weight"])
    linear_errors = {n: errors[n] for n in p.names}
    return {"checkpoint": str(p.source), "out": str(p.out), "tensors_compressed": len(compressed),
            "weights_compressed": weights, **bits,
            "mean_relative_error": sum(linear_errors.values()) / len(linear_errors), "relative_error": errors,
            "row_ranges": len(p.shards), "row_ranges_resumed": len(p.shards) - len(todo),
            "seconds": round(time.time() - started, 3), **_allocation(p, chosen)}


def _allocation(p: JobPlan, chosen: dict[str, Encoding]) -> dict[str, Any]:
    """For a mixed job: the width each linear weight got and how many weights each width holds."""
    if p.mixed is None:
        return {}
    bits = {n: chosen[n].config.bits for n in p.names}
    return {"target_bpw": p.mixed.target_bpw, "importance": p.mixed.importance, "tensor_bits": bits,
            "weights_at_bits": {str(b): sum(math.prod(p.stored[n].shape) for n in p.names if bits[n] == b)
                                for b in sorted(set(p.mixed.bits))}}


def _prepare_work_dir(p: JobPlan) -> set[str]:
    """Create the partial directory, or reopen one `plan_job` found matching; returns the part files done."""
    parts = p.work / PARTS
    if not (p.work / MANIFEST).is_file():
        parts.mkdir(parents=True, exist_ok=True)
        _write_atomic(p.work / MANIFEST, lambda path: path.write_text(json.dumps(p.manifest, indent=1)))
    for leftover in [*parts.glob(".tmp-*"), *p.work.glob(".tmp-*")]:
        leftover.unlink()
    return {f.name for f in parts.glob("*.safetensors")}


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _run_fisher(p: JobPlan) -> None:
    """One Ray task: the squared gradients of the LM loss on the calibration windows, kept in OUT.partial/."""
    import ray

    job = p.job
    task = ray.remote(_squared_gradients).options(num_cpus=job.cpus_per_task,
                                                   num_gpus=1 if job.gpus_per_task > 0 else 0)
    device = "cuda" if job.gpus_per_task > 0 else "cpu"
    log.info("squared gradients of the LM loss on %d calibration tokens", p.calibration[:, 1:].numel())
    fisher = ray.get(task.remote(str(p.source), p.names, p.calibration, p.mixed.batch_size, device,
                                 max(1, int(job.cpus_per_task))))
    _write_atomic(p.work / FISHER, lambda path: save_file(fisher, str(path)))


def _squared_gradients(source: str, names: list[str], windows: torch.Tensor, batch_size: int, device: str,
                       threads: int) -> dict[str, torch.Tensor]:
    """Ray task: per linear weight (stored names), the mean over calibration batches of the squared gradient of
    the mean next-token cross-entropy (a diagonal empirical Fisher), as bfloat16 (fp16 would underflow)."""
    torch.set_num_threads(threads)
    model, logits_fn, vocab = _causal_lm(Path(source), device)
    to_model = hf.parameter_names(source)
    params = {n: model.get_parameter(to_model(n)) for n in names}
    model.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    total = {n: torch.zeros_like(param, dtype=torch.float32) for n, param in params.items()}
    batches = windows.split(batch_size)
    for batch in batches:
        batch = batch.to(device)
        logits = logits_fn(batch[:, :-1])[..., :vocab].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads):
            total[n] += g.float().square()
    return {n: (t / len(batches)).to(torch.bfloat16).cpu() for n, t in total.items()}


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
    fisher = p.work / FISHER if p.calibration is not None else None
    bar = tqdm(total=total, initial=total - len(todo), unit="range", file=sys.stderr,
               disable=not sys.stderr.isatty())
    finished, weights_done, started, last_log = total - len(todo), 0, time.time(), time.time()
    while queue or pending:
        while queue and len(pending) < limit:
            shard = queue.pop(0)
            rows = _read_stored(p.stored[shard.name].file, shard.name, shard.start, shard.stop)
            weights = _read_stored(fisher, shard.name, shard.start, shard.stop) \
                if fisher is not None and shard.name in p.names else None
            pending[task.remote(rows, p.encodings[shard.name], weights, device, threads)] = shard
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(ready[0])
        arrays, meta = ray.get(ready[0])
        _write_atomic(p.work / PARTS / shard.file, lambda path: save_file(arrays, str(path), metadata=meta))
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


def _encode_rows(rows: torch.Tensor, encodings: list[Encoding], weights: torch.Tensor | None, device: str,
                 threads: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Ray task: the codes of a row range under each candidate encoding (arrays `<i>.<field>`), with each one's
    squared error and cost (the squared error weighted by `weights`, else the squared error) and the rows'
    squared norm, all float64, as the part file's metadata."""
    torch.set_num_threads(threads)
    w = rows.double()
    arrays, meta = {}, {"sq_norm": repr(float(w.square().sum()))}
    for i, enc in enumerate(encodings):
        codec = METHODS[enc.method].codec
        codes = codec.encode(rows, enc.config, device)
        sq = (w - codec.decode(codes, enc.config, rows.shape[1]).double()).square()
        meta[f"sq_err.{i}"] = repr(float(sq.sum()))
        meta[f"cost.{i}"] = repr(float((sq * weights.double()).sum())) if weights is not None else meta[f"sq_err.{i}"]
        arrays.update({f"{i}.{field}": array for field, array in codes.items()})
    return arrays, meta


def _assemble(p: JobPlan) -> tuple[dict[str, CompressedTensor], dict[str, float], dict[str, Encoding]]:
    """Each tensor's chosen encoding (`palettize.allocate` when mixed), its parts' codes concatenated in row order
    into a CompressedTensor, and its relative error."""
    sums = {}
    for name in p.encodings:
        metas = []
        for s in (s for s in p.shards if s.name == name):
            with safe_open(str(p.work / PARTS / s.file), framework="pt") as st:
                metas.append(st.metadata())
        sums[name] = {key: sum(float(m[key]) for m in metas) for key in metas[0]}
    chosen = {n: encs[0] for n, encs in p.encodings.items()}
    if p.mixed is not None:
        candidates = {n: [palettize.Candidate(e.config.bits, palettize.stored_bits(p.stored[n].shape, e.config),
                                              sums[n][f"cost.{i}"]) for i, e in enumerate(p.encodings[n])]
                      for n in p.names}
        bits = palettize.allocate(candidates, {n: math.prod(p.stored[n].shape) for n in p.names},
                                  p.mixed.target_bpw)  # plan_job checked that the target can be met
        chosen.update({n: next(e for e in p.encodings[n] if e.config.bits == bits[n]) for n in p.names})
    compressed, errors = {}, {}
    for name, enc in chosen.items():
        i = p.encodings[name].index(enc)
        loaded = []
        for s in (s for s in p.shards if s.name == name):
            with safe_open(str(p.work / PARTS / s.file), framework="pt") as st:
                loaded.append({k.split(".", 1)[1]: st.get_tensor(k) for k in st.keys() if k.startswith(f"{i}.")})
        codes = {k: torch.cat([part[k] for part in loaded]) for k in loaded[0]}
        stored = p.stored[name]
        compressed[name] = CompressedTensor.from_codes(enc.method, enc.config, codes, stored.shape, stored.dtype)
        sq_norm = sums[name]["sq_norm"]
        errors[name] = math.sqrt(sums[name][f"sq_err.{i}"] / sq_norm) if sq_norm > 0 else 0.0
    return compressed, errors, chosen


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
        results[name] = {"bits_per_weight": sum(tensors[n].stored_bytes * 8 for n in names) / weights,
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


def heldout_windows(source: str | Path, cfg: EvalConfig, key: str = "evaluation.text") -> torch.Tensor:
    """The evaluation text (or calibration text; `key` names it in errors) tokenized with the checkpoint's tokenizer
    (or `cfg.tokenizer`), cut into windows."""
    from raytrain.data.corpus import heldout_documents
    from raytrain.data.tokenizer import load_tokenizer

    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else hf.resolve_checkpoint(source)
    if not (tok_dir / "tokenizer.json").is_file():
        raise CompressError(f"{tok_dir} has no tokenizer.json; pass evaluation.tokenizer=DIR for {key}")
    tokenizer = load_tokenizer(tok_dir)
    docs = read_text(cfg.text, cfg.text_field, key) if cfg.text else heldout_documents()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    try:
        return ev.token_windows((bos + tokenizer.encode(d, add_special_tokens=False) for d in docs), cfg.seq_len,
                                cfg.max_tokens)
    except ValueError as e:
        raise CompressError(f"{key}: {e}") from None


def read_text(text: str, text_field: str, key: str) -> list[str]:
    """Documents of `embedded:<source>` (raytrain/data/corpus.py), a .txt file (one document) or a .jsonl file."""
    from raytrain.data import corpus
    from raytrain.data.text import EMBEDDED

    if text.startswith(EMBEDDED):
        name = text.removeprefix(EMBEDDED)
        if name not in corpus.SOURCES:
            raise CompressError(f"{key}={text}: no such embedded source (known: {', '.join(corpus.SOURCES)})")
        return corpus.source(name)
    path = Path(text)
    if not path.is_file():
        raise CompressError(f"{key}={path}: no such file")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)[text_field] for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompressError(f"{key}={path}: a line without a {text_field!r} field ({e})") from None
    return [path.read_text()]
