"""Prompt/completion pairs for supervised fine-tuning, on Ray Data.

A pair is one JSON object per line with a prompt and a completion field (`raytrain data make=sql` writes them). The
prompt becomes the user turn of the tokenizer's chat template with the assistant turn opened (`prompt_ids`, the same
tokens a served chat request or the evaluation feeds the model), the completion is followed by EOS. Each pair is one
training row: `tokens` (seq_len + 1, padded), `lengths` (real tokens) and `prompt_lengths` (tokens before the
completion, which the loss ignores). Lines that are not JSON objects with both fields as strings, and pairs longer
than seq_len + 1 tokens, are skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from raytrain.data.imagetext import count_skip
from raytrain.data.text import DataError, _cached_tokenizer, resolve_files
from raytrain.data.tokenizer import TokenizerFiles, fingerprint


@dataclass
class PairsDataConfig:
    path: str | None = None  # a .jsonl file, directory or glob of prompt/completion pairs
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    seq_len: int = 256  # prompt + completion tokens per row; longer pairs are skipped
    shuffle_seed: int = 0  # per-epoch local shuffles derive from it
    shuffle_buffer: int = 0  # rows in each worker's local shuffle buffer (0 = off)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The tokens a task prompt is given to the model as: one user turn of the tokenizer's chat template with the
    assistant's turn opened; without a template, BOS + the prompt + a newline."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    ids = tokenizer.encode(prompt + "\n", add_special_tokens=False)
    return ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id, *ids]


def pair_rows(lines: list[str], cfg: PairsDataConfig, tokenizer: Any) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """jsonl lines -> training rows, and the counts of what was skipped by reason."""
    width = cfg.seq_len + 1
    tokens, lengths, prompt_lengths = [], [], []
    skipped = {"malformed_pairs": 0, "pairs_longer_than_seq_len": 0}
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt, completion = record[cfg.prompt_field], record[cfg.completion_field]
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            skipped["malformed_pairs"] += 1
            continue
        head = prompt_ids(tokenizer, prompt)
        ids = head + tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(ids) > width:
            skipped["pairs_longer_than_seq_len"] += 1
            continue
        tokens.append(ids + [tokenizer.pad_token_id or 0] * (width - len(ids)))
        lengths.append(len(ids))
        prompt_lengths.append(len(head))
    rows = {"tokens": np.asarray(tokens, dtype=np.int32).reshape(-1, width),
            "lengths": np.asarray(lengths, dtype=np.int32),
            "prompt_lengths": np.asarray(prompt_lengths, dtype=np.int32)}
    return rows, skipped


def _tokenize_batch(batch: dict[str, Any], cfg: PairsDataConfig, files_json: str, key: str,
                    counter: Any) -> dict[str, Any]:
    rows, skipped = pair_rows([str(line) for line in batch["text"]], cfg, _cached_tokenizer(key, files_json))
    for kind, n in skipped.items():
        if n:
            count_skip(counter, kind, n, f"data.path={cfg.path}")
    return rows


def build_dataset(cfg: PairsDataConfig, tokenizer_files: TokenizerFiles, counter: Any = None) -> Any:
    """The pairs of `cfg.path` as training rows (a Ray Dataset); raises if the first pairs hold none usable."""
    import ray.data

    if not cfg.path:
        raise DataError("data.path is required: a .jsonl file of prompt/completion pairs (raytrain data make=sql)")
    files, _ = resolve_files(cfg.path, "jsonl")

    def rows(skips: Any) -> Any:
        return ray.data.read_text(files).map_batches(
            _tokenize_batch, batch_size=256, batch_format="numpy",
            fn_kwargs={"cfg": cfg, "files_json": json.dumps(tokenizer_files), "key": fingerprint(tokenizer_files),
                       "counter": skips})

    if rows(None).limit(1).count() == 0:  # uncounted: the training read counts each skipped pair once
        raise DataError(f"data.path={cfg.path}: no usable pair (fields {cfg.prompt_field!r} and "
                        f"{cfg.completion_field!r} as strings, at most data.seq_len={cfg.seq_len} tokens)")
    return rows(counter)
