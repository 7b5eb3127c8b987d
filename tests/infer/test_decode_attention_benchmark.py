"""benchmarks/decode_attention.py's smoke test: `--device cpu --interpret` runs every path (the single kernel, split
settings that split, one lengthened past MAX_SPLITS, one that does not split) under Triton's interpreter at tiny sizes,
and its JSON line holds each requested point with small errors and equal caches, its timings labelled meaningless."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

if importlib.util.find_spec("triton") is None:
    pytest.skip("the benchmark's kernels need triton", allow_module_level=True)

KEYS, BATCHES, CHUNKS = [40, 300], [1, 2], [32, 128]


def test_interpreted_run_checks_every_split_setting_at_every_point() -> None:
    # a subprocess: the script switches the interpreter on before it imports triton, which this process may have
    # imported already (with or without it)
    command = [sys.executable, "benchmarks/decode_attention.py", "--device", "cpu", "--interpret", "--shapes", "tiny",
               "--keys", ",".join(map(str, KEYS)), "--batches", ",".join(map(str, BATCHES)),
               "--chunks", ",".join(map(str, CHUNKS)), "--max-splits", "4"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])

    assert line["benchmark"] == "decode_attention" and line["device"] == "cpu" and line["time"]
    assert line["command"].startswith("python benchmarks/decode_attention.py --device cpu --interpret")
    config, results = line["config"], line["results"]
    assert config["interpret"] and "MEANINGLESS" in config["timing"] and config["dtype"] == "float32"
    default = config["default_split_keys"]
    assert config["split_keys_swept"] == sorted({*CHUNKS, default}) and config["max_splits"] == 4
    assert "INTERPRETED" in run.stderr  # the table's title says so too

    assert results["all_checks_pass"] and results["copy_bandwidth_tb_s"] > 0
    assert results["max_split_rel_err"] < 1e-4 and results["max_baseline_ref_rel_err"] < 1e-4
    shape = results["shapes"]["tiny"]
    points = shape["points"]
    assert sorted((p["batch"], p["keys"]) for p in points) == sorted((b, k) for b in BATCHES for k in KEYS)
    assert set(line["baseline"]["tiny"]) == {f"batch{b}_keys{k}" for b in BATCHES for k in KEYS}
    launched = set()
    for p in points:
        assert p["checks_pass"] and p["baseline_wrote_key"] and p["baseline_ref_rel_err"] < 1e-4
        assert p["baseline_us"] > 0 and p["baseline_bandwidth_fraction"] > 0
        assert set(p["split"]) == {str(c) for c in config["split_keys_swept"]}
        for chunk, e in p["split"].items():
            assert e["cache_equal"] and e["rel_err"] < 1e-4 and e["us"] > 0 and e["speedup"] > 0, (p["keys"], chunk)
            assert (e["splits"] - 1) * e["chunk"] < p["keys"] <= e["splits"] * e["chunk"]
            launched.add((p["keys"], e["splits"], e["chunk"], e.get("same_as")))
        assert p["speedup"] == pytest.approx(p["baseline_us"] / p["split"][str(default)]["us"])
        assert str(p["best_split_keys"]) in p["split"]
    assert (40, 2, 32, None) in launched and (40, 1, 40, "baseline") in launched  # split, and a setting that is not
    assert (300, 3, 128, None) in launched and (300, 3, 128, "32") in launched  # 32 lengthened to 128 (4 splits max)
    assert shape["best_split_keys"] in config["split_keys_swept"]
    assert set(shape["geomean_speedup"]) == {str(c) for c in config["split_keys_swept"]}
