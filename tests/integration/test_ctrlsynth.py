"""CtrlSynth end to end on Ray Data: shards with provenance, counted bad records, resume with identical bytes."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from raytrain.data import shapes
from raytrain.data.imagetext import ImageTextDataConfig, write_shard
from raytrain.pipelines.ctrlsynth import runner
from raytrain.pipelines.ctrlsynth.config import SynthConfig
from raytrain.pipelines.ctrlsynth.policy import OpConfig, PolicyConfig
from tests.conftest import local_ray

pytestmark = pytest.mark.integration
CFG = SynthConfig(paths=["SP1", "SP2", "SP3", "SP4"], policy="remove",
                  policies={"remove": PolicyConfig(text_ops=[OpConfig("remove", "object", p=0.5)])})


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    local_ray()
    root = tmp_path_factory.mktemp("ctrlsynth")
    world = shapes.WorldConfig()
    (root / "pairs").mkdir()
    for shard, indices in (("a", range(0, 5)), ("b", range(5, 10))):
        samples = [(r["key"], {"png": r["image"], "txt": r["caption"].encode()})
                   for r in (shapes.sample(i, 0, world) for i in indices)]
        if shard == "a":
            samples += [("broken", {"png": b"\x89PNG not really", "txt": b"a red circle"}),
                        ("nocaption", {"png": samples[0][1]["png"]})]
        write_shard(root / "pairs" / f"{shard}.tar", iter(samples))
    data = ImageTextDataConfig(path=str(root / "pairs"))
    return root, data, runner.run(CFG, data, str(root / "out"))


def test_every_record_is_synthesized_or_counted_by_reason(synthesized) -> None:
    root, _, summary = synthesized
    assert (summary["done"], summary["failed"], summary["skipped_finished"]) == (2, 0, 0)
    assert summary["records"] == 11 and summary["dropped"] == {"corrupt_image": 1}
    assert summary["skipped_samples"] == {"incomplete_samples": 1}
    accepted = summary["accepted"]
    rejected = {p: sum(r.values()) for p, r in summary["rejected"].items()}
    assert all(accepted.get(p, 0) + rejected.get(p, 0) == 10 for p in CFG.paths)  # one candidate per path
    assert summary["pairs"] == sum(accepted.values()) >= 20
    assert summary["rejected"]["SP2"].get("duplicate", 0) > 0  # the template writer's SP2 mostly restates SP1
    assert 0 < summary["distinct_caption_ratio"] <= 1
    errors = [json.loads(line) for line in (root / "out" / "errors.jsonl").read_text().splitlines()]
    broken = [e for e in errors if e["where"] == "broken"]
    assert len(broken) == 1 and broken[0]["id"] == "a" and broken[0]["reason"].startswith("corrupt_image")
    assert len(errors) == 1 + sum(rejected.values())


def test_shards_carry_provenance_and_each_path_its_pair_type(synthesized) -> None:
    root, _, _ = synthesized
    sources = members(root / "pairs" / "a.tar")
    pairs = members(root / "out" / "a" / "pairs.tar")
    manifest = json.loads((root / "out" / "a" / "_SUCCESS.json").read_text())
    assert manifest["counts"]["pairs"] * 3 == len(pairs) and manifest["stage_versions"]["tagger"] == "templates-1"
    provenance = [json.loads(v) for k, v in pairs.items() if k.endswith(".json")]
    assert {"SP1", "SP3", "SP4"} <= {p["path"] for p in provenance}
    on_real = [(p["source_id"], runner.caption_key(p["caption"])) for p in provenance if p["path"] in ("SP1", "SP2")]
    assert len(on_real) == len(set(on_real))  # no real image keeps one caption twice (dedupe)
    for p in provenance:
        assert {"source_id", "source_file", "policy", "tags", "source_tags", "edits", "scores", "seeds", "models",
                "normalizer"} <= set(p)
        name = f"{p['source_id']}_{p['path'].lower()}"
        assert pairs[f"{name}.txt"].decode() == p["caption"]
        real = pairs[f"{name}.png"] == sources[f"{p['source_id']}.png"]
        assert real == (p["path"] in ("SP1", "SP2"))  # text paths keep the real image, image paths draw a new one
        if p["path"] == "SP4":
            assert p["caption"] == p["original_caption"] and p["scores"]["image_match"] >= CFG.tau_image
        else:
            assert p["scores"]["text_coverage"] >= CFG.tau_text
            assert not set(p["forbidden"]) & set(p["tags"]["objects"])


def test_a_rerun_after_a_kill_skips_finished_shards_and_writes_the_same_bytes(synthesized) -> None:
    root, data, _ = synthesized
    resumed = root / "resumed"
    shutil.copytree(root / "out", resumed)
    shutil.rmtree(resumed / "b")  # killed before shard b finished: a partial file is left behind
    (resumed / "b").mkdir()
    (resumed / "b" / "pairs.tar.tmp").write_bytes(b"partial")
    summary = runner.run(CFG, data, str(resumed))
    assert (summary["done"], summary["skipped_finished"], summary["records"]) == (1, 1, 5)
    for shard in ("a", "b"):
        assert (resumed / shard / "pairs.tar").read_bytes() == (root / "out" / shard / "pairs.tar").read_bytes()
