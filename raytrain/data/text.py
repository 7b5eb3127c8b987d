"""Text corpora on Ray Data: read, split, tokenize and chunk into fixed-length training sequences.

Inputs are a directory, glob or file of .txt (one document per file), .jsonl (one document per line, field
`text_field`), .parquet or .arrow (column `text_field`; .arrow files are Arrow IPC streams, what the `datasets`
package writes), a directory a `datasets` Dataset or DatasetDict was saved to (`save_to_disk`; split `split`), or
`embedded:<name>` (a source of `corpus.py`); with no path, the embedded corpus. Chunking follows OpenELM's
`general_lm` rules (spec section 3): split each document into pieces of `words_per_piece` words, drop pieces under
`min_chars` normalised characters, tokenize with BOS and EOS, drop pieces under `min_tokens` tokens, then truncate
or pad to `seq_len + 1` tokens. `packing=true` instead concatenates the pieces of a batch and cuts them into full
sequences (no padding; logged as a deviation from the reference). The rows travel as one fixed-shape int32 tensor
column, "tokens".

Several `sources` with `mixture` weights form a data mixture: each source is tokenized and counted, then sampled
(repeated where its weight asks for more rows than it has) so that one epoch of the mixture holds as many rows as
all sources together, in the weights' proportions, and globally shuffled with a fixed seed.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import random
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raytrain.config import RaytrainError
from raytrain.data import corpus
from raytrain.data.tokenizer import TokenizerFiles, fingerprint, from_files

log = logging.getLogger(__name__)

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_DATASET = ("state.json", "dataset_dict.json")  # what Dataset / DatasetDict.save_to_disk write
DATASET_METADATA = {"dataset_info.json", *SAVED_DATASET}  # beside .arrow files; not documents
EMBEDDED = "embedded:"
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


class DataError(RaytrainError):
    pass


@dataclass
class TextDataConfig:
    path: str | None = None  # directory, glob, file or embedded:<name>; None = the embedded corpus
    sources: dict[str, str] | None = None  # several named paths (like `path`) mixed by `mixture`; replaces `path`
    mixture: dict[str, float] | None = None  # source name -> sampling weight (absent = 0); None = natural sizes
    format: str = "auto"  # txt | jsonl | parquet | arrow | auto (by file extension)
    text_field: str = "text"  # jsonl field / parquet or arrow column holding the document
    split: str = "train"  # the split of a saved `datasets` DatasetDict
    seq_len: int = 2048
    words_per_piece: int = 2048
    min_chars: int = 200
    min_tokens: int = 256
    packing: bool = False
    shuffle_seed: int = 0  # file-order shuffle; per-epoch local shuffles derive from it
    shuffle_buffer: int = 0  # rows in each worker's local shuffle buffer (0 = off)
    tokenizer: str | None = None  # existing tokenizer directory; None = train a BPE on the corpus
    vocab_size: int = 32000  # size of the BPE to train
    tokenizer_train_chars: int = 50_000_000  # characters of the corpus the BPE is trained on

    def __post_init__(self) -> None:
        if self.format not in ("auto", *FORMATS.values()):
            raise ValueError(f"format={self.format!r}; expected auto, txt, jsonl, parquet or arrow")
        if self.seq_len < 2 or self.words_per_piece < 1:
            raise ValueError("seq_len must be >= 2 and words_per_piece >= 1")
        if self.sources is not None and self.path is not None:
            raise ValueError("set path or sources, not both")
        if self.mixture is not None:
            mixture_weights(self)

    def paths(self) -> dict[str, str | None]:
        """Source name -> path: the `sources`, or the single `path` as source "text"."""
        return dict(self.sources) if self.sources else {"text": self.path}


def mixture_weights(cfg: TextDataConfig) -> dict[str, float]:
    """Each source's share of the mixture (summing to 1); sources the mixture leaves out get 0."""
    names = list(cfg.paths())
    weights = dict(cfg.mixture) if cfg.mixture is not None else {name: 1.0 for name in names}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"mixture names {unknown}, which are not in sources ({', '.join(names)})")
    negative = {k: v for k, v in weights.items() if v < 0}
    if negative:
        raise ValueError(f"mixture weights must not be negative: {negative}")
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"mixture weights must sum to a positive value (they sum to {total})")
    return {name: weights.get(name, 0.0) / total for name in names}


# ---- pure functions: the chunking rules ------------------------------------------------------------------------

def split_document(text: str, words_per_piece: int) -> list[str]:
    """Split on single spaces into pieces of `words_per_piece` words (the reference keeps newlines in words)."""
    words = text.split(" ")
    return [" ".join(words[i:i + words_per_piece]) for i in range(0, len(words), words_per_piece)]


def normalized_length(piece: str) -> int:
    """Length after lowercasing, removing punctuation and collapsing whitespace."""
    return len(" ".join(_PUNCTUATION.sub("", piece.lower()).split()))


def to_sequences(pieces: list[list[int]], cfg: TextDataConfig, bos: int, eos: int, pad: int) -> np.ndarray:
    """Token lists of usable pieces -> (n, seq_len + 1) int32 sequences."""
    width = cfg.seq_len + 1
    framed = [[bos, *ids, eos] for ids in pieces]
    framed = [t for t in framed if len(t) >= cfg.min_tokens]
    if cfg.packing:
        stream = [tok for t in framed for tok in t]
        n = len(stream) // width
        return np.asarray(stream[:n * width], dtype=np.int32).reshape(n, width)
    out = np.full((len(framed), width), pad, dtype=np.int32)
    for row, t in zip(out, framed):
        t = t[:width]
        row[:len(t)] = t
    return out


# ---- files -----------------------------------------------------------------------------------------------------

def check_paths(cfg: TextDataConfig) -> None:
    """Every source path resolves to files (or names an embedded source), checked before Ray starts."""
    for name, path in cfg.paths().items():
        if path is None:
            continue
        if path.startswith(EMBEDDED):
            if path.removeprefix(EMBEDDED) not in corpus.SOURCES:
                where = "data.path" if cfg.sources is None else f"data.sources.{name}"
                raise DataError(f"{where}={path}: no such embedded source (known: {', '.join(corpus.SOURCES)})")
        else:
            resolve_files(path, cfg.format, cfg.split)


def resolve_files(path: str, fmt: str = "auto", split: str = "train") -> tuple[list[str], str]:
    """Expand a directory, glob or file into a sorted file list of one format; a directory a `datasets` dataset
    was saved to gives its Arrow files (of `split`, for a DatasetDict)."""
    if Path(path).is_dir() and any((Path(path) / name).is_file() for name in SAVED_DATASET):
        if fmt not in ("auto", "arrow"):
            raise DataError(f"data.path={path} is a saved Hugging Face dataset (Arrow files), not data.format={fmt}")
        return saved_dataset_files(path, split), "arrow"
    if any(ch in path for ch in "*?["):
        candidates = sorted(glob.glob(path, recursive=True))
        if not candidates:
            raise DataError(f"data.path={path}: the pattern matches no files")
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"data.path={path}: no such file or directory")
        candidates = sorted(str(f) for f in p.rglob("*")) if p.is_dir() else [str(p)]
    files = [f for f in candidates
             if Path(f).is_file() and Path(f).suffix in FORMATS and Path(f).name not in DATASET_METADATA]
    if not files:
        raise DataError(f"data.path={path}: no .txt, .jsonl, .parquet or .arrow files there")
    formats = {FORMATS[Path(f).suffix] for f in files} if fmt == "auto" else {fmt}
    if len(formats) > 1:
        raise DataError(f"data.path={path}: mixes formats {sorted(formats)}; set data.format or narrow the path")
    fmt = formats.pop()
    files = [f for f in files if FORMATS[Path(f).suffix] == fmt]
    if all(Path(f).stat().st_size == 0 for f in files):
        raise DataError(f"data.path={path}: every file is empty")
    return files, fmt


def saved_dataset_files(path: str, split: str) -> list[str]:
    """The Arrow files of a `datasets` Dataset (or of split `split` of a DatasetDict) saved with `save_to_disk`.
    `datasets` only opens them (memory-mapped); Ray Data reads them in its tasks."""
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError, JSON and Arrow errors for damaged directories
        raise DataError(f"data.path={path}: not a readable saved Hugging Face dataset ({e})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"data.split={split}: {path} holds the splits {', '.join(saved)}")
        saved = saved[split]
    files = [f["filename"] for f in saved.cache_files]
    if not files:
        raise DataError(f"data.path={path}: the saved dataset has no Arrow files")
    return files


def _decode_txt(batch: dict[str, Any]) -> dict[str, Any]:
    return {"text": [b.decode("utf-8", errors="replace") for b in batch["bytes"]]}


def _parse_jsonl(batch: dict[str, Any], field: str) -> dict[str, Any]:
    texts, bad = [], 0
    for line in batch["text"]:
        if not line.strip():
            continue
        try:
            value = json.loads(line).get(field)
        except (json.JSONDecodeError, AttributeError):
            value = None
        if isinstance(value, str):
            texts.append(value)
        else:
            bad += 1
    if bad:
        log.warning("skipped %d jsonl records that are not JSON objects with a string field %r", bad, field)
    return {"text": texts}


def read_documents(cfg: TextDataConfig, path: str | None) -> Any:
    """A Ray Dataset with one column, "text", one row per document of `path`, in a seeded file order."""
    import ray.data

    if path is None:
        return ray.data.from_items([{"text": t} for t in corpus.documents()])
    if path.startswith(EMBEDDED):
        return ray.data.from_items([{"text": t} for t in corpus.source(path.removeprefix(EMBEDDED))])
    files, fmt = resolve_files(path, cfg.format, cfg.split)
    random.Random(cfg.shuffle_seed).shuffle(files)  # the reference shuffles the file list, not documents
    if fmt == "txt":
        return ray.data.read_binary_files(files).map_batches(_decode_txt, batch_format="numpy")
    if fmt == "jsonl":
        return ray.data.read_text(files).map_batches(_parse_jsonl, fn_kwargs={"field": cfg.text_field})
    if fmt == "arrow":
        from raytrain.data.arrow_files import ArrowStreamFiles, check_column

        check_column(files[0], cfg.text_field)
        return ray.data.read_datasource(ArrowStreamFiles(files, cfg.text_field))
    _check_parquet_column(files[0], cfg.text_field)
    return ray.data.read_parquet(files, columns=[cfg.text_field]).rename_columns({cfg.text_field: "text"})


def _check_parquet_column(file: str, column: str) -> None:
    import pyarrow.parquet as pq

    names = pq.read_schema(file).names
    if column not in names:
        raise DataError(f"data.text_field={column}: {file} has no such column (columns: {', '.join(names)})")


# ---- tokenization on Ray Data ----------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}  # per worker process: Ray Data reuses processes across tasks


def _cached_tokenizer(key: str, files_json: str) -> Any:
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = from_files(json.loads(files_json))
    return _TOKENIZERS[key]


def tokenize_documents(docs: list[str], cfg: TextDataConfig, tok: Any) -> np.ndarray:
    """Documents -> (n, seq_len + 1) training sequences with the chunking rules (also used in-process, for eval)."""
    pieces = [p for doc in docs for p in split_document(str(doc), cfg.words_per_piece)
              if normalized_length(p) >= cfg.min_chars]
    ids = tok(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    return to_sequences(ids, cfg, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def _tokenize_batch(batch: dict[str, Any], cfg: TextDataConfig, files_json: str,
                    key: str) -> Iterator[dict[str, Any]]:
    """Yields nothing for a batch without a usable piece: an empty (0, seq_len + 1) array is no Arrow tensor, and
    Ray Data would store that block's column as pickled objects."""
    tokens = tokenize_documents(list(batch["text"]), cfg, _cached_tokenizer(key, files_json))
    if len(tokens):
        yield {"tokens": tokens}


def build_dataset(cfg: TextDataConfig, tokenizer_files: TokenizerFiles) -> Any:
    """Documents -> (seq_len + 1)-token rows in column "tokens"; raises if a source yields none."""
    if cfg.packing:
        log.info("data.packing=true: sequences are packed across documents (the OpenELM reference pads instead)")
    if cfg.mixture is None and len(cfg.paths()) == 1:
        return _tokenized(cfg, next(iter(cfg.paths().values())), tokenizer_files, check=True)
    return _mixture(cfg, tokenizer_files)


def _tokenized(cfg: TextDataConfig, path: str | None, tokenizer_files: TokenizerFiles, check: bool) -> Any:
    ds = read_documents(cfg, path).map_batches(
        _tokenize_batch, batch_size=64, batch_format="numpy",
        fn_kwargs={"cfg": cfg, "files_json": json.dumps(tokenizer_files), "key": fingerprint(tokenizer_files)})
    if check and ds.limit(1).count() == 0:
        raise _no_usable_documents(cfg, path)
    return ds


def _no_usable_documents(cfg: TextDataConfig, path: str | None) -> DataError:
    return DataError(f"no usable documents in {path or 'the embedded corpus'}: no piece reaches data.min_chars="
                     f"{cfg.min_chars} characters and data.min_tokens={cfg.min_tokens} tokens (is data.text_field "
                     "right?)")


def _mixture(cfg: TextDataConfig, tokenizer_files: TokenizerFiles) -> Any:
    """One epoch of the weighted mixture: as many rows as all sources hold, source i contributing weight_i of them
    (its rows in order, cycled if it has fewer), globally shuffled with `shuffle_seed`. Sources are tokenized once
    and held in the object store (Ray Data materialize) to be counted and cycled."""
    weights = mixture_weights(cfg) if cfg.mixture is not None else None
    parts = {name: _tokenized(cfg, path, tokenizer_files, check=False).materialize()
             for name, path in cfg.paths().items() if weights is None or weights[name] > 0}
    counts = {name: ds.count() for name, ds in parts.items()}
    for name, count in counts.items():
        if count == 0:
            raise _no_usable_documents(cfg, cfg.paths()[name])
    total = sum(counts.values())
    sampled, rows = [], {}
    for name, ds in parts.items():
        rows[name] = round(weights[name] * total) if weights is not None else counts[name]
        repeats = math.ceil(rows[name] / counts[name])
        sampled.append((ds.union(*[ds] * (repeats - 1)) if repeats > 1 else ds).limit(rows[name]))
    log.info("data mixture of %d rows per epoch: %s", sum(rows.values()),
             ", ".join(f"{name} {rows[name]} ({rows[name] / counts[name]:.2f}x its {counts[name]})" for name in rows))
    mixed = sampled[0].union(*sampled[1:]) if len(sampled) > 1 else sampled[0]
    return mixed.random_shuffle(seed=cfg.shuffle_seed)


def tokenizer_texts(cfg: TextDataConfig) -> Iterator[str]:
    """Documents of every source, in turn, for training the BPE, up to `tokenizer_train_chars` characters."""
    budget = cfg.tokenizer_train_chars
    for path in cfg.paths().values():
        for row in read_documents(cfg, path).iter_rows():
            text = str(row["text"])
            yield text[:budget]
            budget -= len(text)
            if budget <= 0:
                return
