"""Byte-level BPE tokenizer trained with `tokenizers` on the training corpus.

The tokenizer travels as its Hugging Face files (`TokenizerFiles`: file name -> text), so the driver can train it
once and ship it to Ray workers and Ray Data actors, and every checkpoint saves the same files beside the weights.
Special tokens follow the LLaMA convention OpenELM uses: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), plus <pad>=3.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from raytrain.config import RaytrainError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
TokenizerFiles = dict[str, str]


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` entries (special tokens included)."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def to_files(tokenizer: PreTrainedTokenizerFast) -> TokenizerFiles:
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_text() for p in Path(d).iterdir() if p.is_file()}


def from_files(files: TokenizerFiles) -> PreTrainedTokenizerFast:
    with tempfile.TemporaryDirectory() as d:
        write_files(files, Path(d))
        return PreTrainedTokenizerFast.from_pretrained(d)


def write_files(files: TokenizerFiles, directory: Path) -> None:
    for name, text in files.items():
        (directory / name).write_text(text)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer from a directory (tokenizer.json + tokenizer_config.json)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise RaytrainError(f"no tokenizer.json in {path}")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def caption_tokens(tok: PreTrainedTokenizerFast, captions: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (B, length) int64 ids, BOS + ids + EOS cut or right-padded to `length` (EOS kept), and (B,) the
    real lengths: the text input of CLIP's text tower, in training and wherever its text features are used."""
    ids = tok(captions, add_special_tokens=False)["input_ids"]
    tokens = np.full((len(ids), length), tok.pad_token_id, dtype=np.int64)
    lengths = np.zeros(len(ids), dtype=np.int64)
    for i, seq in enumerate(ids):
        seq = [tok.bos_token_id, *seq[:length - 2], tok.eos_token_id]
        tokens[i, :len(seq)] = seq
        lengths[i] = len(seq)
    return tokens, lengths


def fingerprint(files: TokenizerFiles) -> str:
    """Stable id of a tokenizer's vocabulary and merges (or of every file, for runs that keep other text-side
    files, such as a synset vocabulary), to detect a changed tokenizer on resume."""
    content = files["tokenizer.json"] if "tokenizer.json" in files else "\0".join(
        f"{name}\0{files[name]}" for name in sorted(files))
    return hashlib.sha256(content.encode()).hexdigest()[:16]
