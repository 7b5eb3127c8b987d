"""benchmarks/store_shards.py on a tiny random model: the replica alone and two Ray shard actors answer every question
alike, the line counts them, and the KV that left the shards is the kept path's (one document and one query copy) of
the store's."""

from __future__ import annotations

import importlib.util
import json
import sys

from tests.conftest import REPO, local_ray
from tests.serving.test_model import rag_checkpoint

spec = importlib.util.spec_from_file_location("store_shards_bench", REPO / "benchmarks" / "store_shards.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

COLOURS = ["red", "blue", "green", "white", "black"]


def test_the_line_counts_agreeing_answers_and_the_kv_moved(tmp_path, tokenizer, monkeypatch, capsys) -> None:
    local_ray()
    checkpoint = rag_checkpoint(tmp_path, tokenizer)
    docs = [f"The code of the {c} falcon is {1000 + 7 * i}." for i, c in enumerate(COLOURS)]
    asked = [{"question": f"What is the code of the {c} falcon?", "answer": str(1000 + 7 * i), "gold": [i]}
             for i, c in ((0, "red"), (3, "white"))]
    monkeypatch.setattr(bench, "question_sets", lambda *args: [(docs, asked)])  # short documents: a tiny window
    monkeypatch.setattr(sys, "argv", ["store_shards.py", "--checkpoint", str(checkpoint), "--sets", "1",
                                      "--shards", "2", "--max-tokens", "4", "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out  # Ray's driver log may share stdout with the line
    line = json.loads(next(row for row in out.splitlines() if row.startswith('{"benchmark"')))
    assert line["questions"] == 2 and line["agree"] == 2 and line["config"]["shards"] == 2
    assert 0 < line["sharded"]["moved_kv_mb_mean"] < line["baseline"]["alone"]["store_kv_mb_mean"] / 2
    assert line["ratio_sharded_over_alone"] > 0 and line["documents_mean"] == len(docs)
