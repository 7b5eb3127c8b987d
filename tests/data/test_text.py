"""OpenELM's chunking rules, input resolution and its errors, and the BPE tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from raytrain.data.text import (DataError, TextDataConfig, _tokenize_batch, normalized_length, resolve_files,
                                split_document, to_sequences)
from raytrain.data.tokenizer import fingerprint, from_files, to_files


def test_documents_split_on_single_spaces_into_word_pieces() -> None:
    text = " ".join(f"w{i}" for i in range(10))
    assert split_document(text, 4) == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert split_document("a\nb c", 2) == ["a\nb c"]  # newlines stay inside words, as in the reference


def test_normalized_length_drops_case_punctuation_and_extra_whitespace() -> None:
    assert normalized_length("Hello,   World!\n\n") == len("hello world")


def test_sequences_are_framed_filtered_truncated_and_padded() -> None:
    cfg = TextDataConfig(seq_len=5, min_tokens=4)
    out = to_sequences([[7, 8], [7, 8, 9, 10, 11, 12], [5]], cfg, bos=1, eos=2, pad=3)
    # [1,7,8,2] is kept (4 tokens) and padded to 6; the long piece is truncated to 6; [1,5,2] is dropped
    assert out.tolist() == [[1, 7, 8, 2, 3, 3], [1, 7, 8, 9, 10, 11]]
    assert out.dtype == np.int32


def test_packing_concatenates_without_padding() -> None:
    cfg = TextDataConfig(seq_len=3, min_tokens=1, packing=True)
    out = to_sequences([[7, 8], [9, 10, 11]], cfg, bos=1, eos=2, pad=3)
    assert out.tolist() == [[1, 7, 8, 2], [1, 9, 10, 11]]  # the trailing [2] is dropped


def test_missing_and_empty_inputs_are_named(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        resolve_files(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no .txt, .jsonl, .parquet or .arrow"):
        resolve_files(str(tmp_path))
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError, match="every file is empty"):
        resolve_files(str(tmp_path))
    (tmp_path / "b.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="mixes formats"):
        resolve_files(str(tmp_path))
    with pytest.raises(DataError, match="matches no files"):
        resolve_files(str(tmp_path / "*.parquet"))


def test_resolve_files_by_directory_glob_and_format(tmp_path) -> None:
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps({"text": name}) + "\n")
    files, fmt = resolve_files(str(tmp_path))
    assert fmt == "jsonl" and [f.split("/")[-1] for f in files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert len(resolve_files(str(tmp_path / "*.jsonl"))[0]) == 2


def test_config_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="format='csv'"):
        TextDataConfig(format="csv")


def test_tokenizer_round_trips_through_its_files(tokenizer) -> None:
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == [0, 1,
                                                                                                             2, 3]
    files = to_files(tokenizer)
    again = from_files(files)
    text = "The if statement is used for conditional execution: café"
    assert again.decode(again.encode(text, add_special_tokens=False)) == text  # byte-level: no unknown characters
    assert again.encode(text) == tokenizer.encode(text)
    assert fingerprint(files) == fingerprint(to_files(again))


def test_token_batches_become_fixed_size_int32_tensor_columns(tokenizer) -> None:
    """What Ray Data stores of each tokenized batch: a (seq_len + 1) int32 tensor column. A batch with no usable
    piece yields nothing; an empty (0, 33) array would be stored as pickled Python objects."""
    from ray.data.block import BlockAccessor
    from ray.data.extensions import ArrowTensorTypeV2

    doc = " ".join(["the if statement selects exactly one of the suites by evaluating the expressions"] * 8)
    cfg = TextDataConfig(seq_len=32, words_per_piece=40, min_chars=50, min_tokens=8)
    files = to_files(tokenizer)
    batches = [{"text": np.array(["too short", "also short"])}, {"text": np.array([doc, doc])}]
    outputs = [out for batch in batches for out in _tokenize_batch(batch, cfg, json.dumps(files), fingerprint(files))]
    assert [len(out["tokens"]) for out in outputs] == [2 * 3]
    column = BlockAccessor.batch_to_block(outputs[0]).schema.field("tokens").type
    assert isinstance(column, ArrowTensorTypeV2) and column.shape == (33,) and column.value_type == pa.int32()
