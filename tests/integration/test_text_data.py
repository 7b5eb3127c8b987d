"""The Ray Data text pipeline on each input format, with bad records skipped rather than fatal."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain.data.text import DataError, TextDataConfig, build_dataset
from raytrain.data.tokenizer import to_files

pytestmark = pytest.mark.integration
DOC = " ".join(["the if statement selects exactly one of the suites by evaluating the expressions"] * 8)


def rows(path, tokenizer, fmt: str = "auto", field: str = "text", split: str = "train") -> np.ndarray:
    cfg = TextDataConfig(path=str(path), format=fmt, text_field=field, split=split, seq_len=32, words_per_piece=40,
                         min_chars=50, min_tokens=8)
    ds = build_dataset(cfg, to_files(tokenizer))
    return np.stack([r["tokens"] for r in ds.take_all()])


def test_jsonl_skips_malformed_records(ray_cluster, tmp_path, tokenizer) -> None:
    lines = [json.dumps({"text": DOC}), "{not json", json.dumps({"body": DOC}), json.dumps([1]), "",
             json.dumps({"text": DOC})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    out = rows(tmp_path / "a.jsonl", tokenizer)
    assert out.shape == (2 * 3, 33)  # 2 good documents x 3 pieces (DOC has 104 words: 40 + 40 + 24)
    assert (out[:, 0] == tokenizer.bos_token_id).all()


def test_txt_files_are_documents_and_parquet_reads_its_column(ray_cluster, tmp_path, tokenizer) -> None:
    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"{i}.txt").write_text(DOC)
    assert len(rows(tmp_path / "txt", tokenizer)) == 3 * 3
    pq.write_table(pa.table({"content": [DOC, DOC], "id": [1, 2]}), tmp_path / "d.parquet")
    assert len(rows(tmp_path / "d.parquet", tokenizer, field="content")) == 2 * 3
    with pytest.raises(DataError, match="data.text_field=text: .* has no such column \\(columns: content, id\\)"):
        rows(tmp_path / "d.parquet", tokenizer)


def test_a_saved_hugging_face_dataset_is_a_path_like_any_other(ray_cluster, tmp_path, tokenizer) -> None:
    """`save_to_disk` of a Dataset and of a DatasetDict (its `data.split`), and the .arrow files themselves (how a
    hub dataset lies in the datasets cache)."""
    import datasets

    short = " ".join(DOC.split()[:40])  # one piece
    datasets.Dataset.from_dict({"content": [DOC, DOC, DOC], "id": [1, 2, 3]}).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": [DOC] * 2}),
                          "test": datasets.Dataset.from_dict({"content": [short]})}).save_to_disk(tmp_path / "two")
    assert len(rows(tmp_path / "one", tokenizer, field="content")) == 3 * 3
    assert len(rows(tmp_path / "two", tokenizer, field="content")) == 2 * 3
    assert len(rows(tmp_path / "two", tokenizer, field="content", split="test")) == 1
    assert len(rows(tmp_path / "one" / "*.arrow", tokenizer, field="content")) == 3 * 3
    with pytest.raises(DataError, match="data.split=validation: .* holds the splits train, test"):
        rows(tmp_path / "two", tokenizer, field="content", split="validation")
    with pytest.raises(DataError, match="data.text_field=text: .* has no such column \\(columns: content, id\\)"):
        rows(tmp_path / "one", tokenizer)


def test_a_weighted_mixture_has_the_weights_proportions_and_cycles_a_small_source(ray_cluster, tokenizer) -> None:
    """A 65-token recall row always holds a whole record line, so a hyphenated key like "quartz-kelp"; arithmetic
    rows never do. With weights 1:3 one epoch holds as many rows as both sources, 3/4 of them arithmetic, which is
    smaller than that share and repeats."""
    cfg = TextDataConfig(sources={"recall": "embedded:recall", "math": "embedded:arithmetic"},
                         mixture={"recall": 1.0, "math": 3.0}, seq_len=64, words_per_piece=256, min_chars=20,
                         min_tokens=8, packing=True)
    natural = TextDataConfig(**{**cfg.__dict__, "mixture": None})
    counts = [len(build_dataset(TextDataConfig(**{**cfg.__dict__, "sources": {n: p}, "mixture": None}),
                                to_files(tokenizer)).take_all()) for n, p in cfg.sources.items()]
    mixed = np.stack([r["tokens"] for r in build_dataset(cfg, to_files(tokenizer)).take_all()])
    texts = tokenizer.batch_decode(mixed.tolist())
    is_recall = [re.search(r"[a-z]+-[a-z]+", t) is not None for t in texts]
    recall = sum(is_recall)
    assert len(mixed) == sum(counts) == len(build_dataset(natural, to_files(tokenizer)).take_all())
    assert recall == round(0.25 * sum(counts))
    math_rows = {tuple(row) for row, r in zip(mixed.tolist(), is_recall) if not r}
    assert len(math_rows) < len(mixed) - recall  # some arithmetic rows appear twice
