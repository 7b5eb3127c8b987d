"""Auto-labeling end to end on Ray Data: AP on synthetic scenes, the moving-only baseline, resume, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from raytrain.commands.autolabel_eval import evaluate
from raytrain.data.lidar import Sequence, find_sequences, write_frame, write_meta
from raytrain.data.lidar_scenes import SceneConfig, write_scene, write_scenes
from raytrain.pipelines.autolabel import runner
from raytrain.pipelines.autolabel.config import AutolabelConfig
from raytrain.pipelines.autolabel.evaluate import EvalConfig
from tests.conftest import local_ray

pytestmark = pytest.mark.integration
SCENES = SceneConfig(frames=20)
AP_FLOOR = 0.4  # class-agnostic 3D AP@0.5 stated in the README for these scenes (measured 0.47; deterministic)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Two synthetic sequences labelled by the full pipeline and by the moving-only baseline."""
    local_ray()  # module-scoped, so not the function-scoped `ray_cluster` fixture
    root = tmp_path_factory.mktemp("autolabel")
    write_scenes(root / "data", 2, SCENES, seed=11)
    full = runner.run(AutolabelConfig(), str(root / "data"), str(root / "full"), workers=2)
    base = runner.run(AutolabelConfig(mode="moving_only"), str(root / "data"), str(root / "base"), workers=2)
    return root, full, base


def test_full_pipeline_reaches_the_stated_ap_and_beats_moving_only_on_static_objects(labelled) -> None:
    root, full, base = labelled
    assert (full["done"], full["failed"], base["done"]) == (2, 0, 2)
    seqs = find_sequences(root / "data")
    ours = evaluate(seqs, root / "full", EvalConfig())
    baseline = evaluate(seqs, root / "base", EvalConfig())
    assert ours["class_agnostic"]["3d@0.5"] >= AP_FLOOR, ours
    assert ours["static"]["3d@0.5"] >= baseline["static"]["3d@0.5"] + 0.2, (ours["static"], baseline["static"])
    assert ours["per_class"]["car"]["3d@0.5"] > 0.3  # open-vocabulary labels from the text query "car"
    assert baseline["class_agnostic"]["3d@0.5"] < ours["class_agnostic"]["3d@0.5"]


def test_outputs_per_frame_with_provenance(labelled) -> None:
    root, _, _ = labelled
    seq = Sequence(root / "data" / "seq_0000")
    out = root / "full" / "seq_0000"
    manifest = json.loads((out / "_SUCCESS.json").read_text())
    assert manifest["input_id"] == "seq_0000" and manifest["stage_versions"] == runner.STAGE_VERSIONS
    assert len(manifest["config_hash"]) == 16 and manifest["counts"]["frames"] == seq.num_frames
    labels = [json.loads((out / "labels" / f"{i:06d}.json").read_text()) for i in range(seq.num_frames)]
    objects = [o for lab in labels for o in lab["objects"]]
    assert objects and {o["label"] for o in objects} <= {"car", "truck", "pedestrian", "cyclist", "unknown"}
    assert any(o["moving"] for o in objects) and any(not o["moving"] for o in objects)
    with np.load(out / "features" / "000003.npz") as z:
        assert z["features"].dtype == np.float16 and len(z["features"]) == z["visible"].sum() > 0
        assert np.allclose(np.linalg.norm(z["features"].astype(np.float32), axis=1), 1, atol=1e-2)
    assert not list(out.rglob("*.tmp"))


def test_rerun_skips_finished_sequences_and_refuses_another_config(labelled) -> None:
    root, _, _ = labelled
    label_file = root / "full" / "seq_0001" / "labels" / "000000.json"
    before = label_file.stat().st_mtime_ns
    again = runner.run(AutolabelConfig(), str(root / "data"), str(root / "full"), workers=2)
    assert (again["skipped_finished"], again["done"], again["failed"]) == (2, 0, 0)
    assert label_file.stat().st_mtime_ns == before
    with pytest.raises(Exception, match="labelled with another config"):
        runner.run(AutolabelConfig(mode="moving_only"), str(root / "data"), str(root / "full"), workers=2)


def test_bad_input_is_counted_and_reported_not_fatal(ray_cluster, tmp_path) -> None:
    data = tmp_path / "data"
    small = SceneConfig(frames=8, azimuth_step=0.4)
    seq = Sequence(write_scene(data / "problems", small, seed=5))
    broken = [seq.frame(i) for i in (2, 4, 6)]
    broken[0].points = np.zeros((0, 4), np.float32)  # a frame with no points
    del broken[1].images[seq.cameras[0].name]  # a missing camera
    broken[2].pose = np.diag([1.0, 1.0, 1.0, 0.0])  # a malformed pose
    for f in broken:
        write_frame(seq.root, f)
    one = Sequence(write_scene(data / "one_frame", SceneConfig(frames=1), seed=6))
    (data / "bad_meta").mkdir()
    (data / "bad_meta" / "meta.json").write_text("{")
    summary = runner.run(AutolabelConfig(), str(data), str(tmp_path / "out"), workers=2)
    assert (summary["done"], summary["failed"]) == (1, 2)
    assert summary["problems"] == {"no_points": 1, "missing_camera": 1, "bad_pose": 1}
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    by_id = {e["id"]: e for e in errors if "error" in e}
    assert "1 frame(s)" in by_id[one.id]["error"] and "meta.json" in by_id["bad_meta"]["error"]
    assert sorted(e["frame"] for e in errors if e["id"] == "problems") == [2, 4, 6]
    bad_frame = json.loads((tmp_path / "out" / "problems" / "labels" / "000006.json").read_text())
    assert bad_frame["objects"] == [] and bad_frame["problems"][0].startswith("bad_pose")
    shutil.rmtree(data / "bad_meta")
    write_meta(data / "bad_meta", "bad_meta", 0, 0.1, [])  # fixed, but still unusable: zero frames
    rerun = runner.run(AutolabelConfig(), str(data), str(tmp_path / "out"), workers=2)
    assert (rerun["skipped_finished"], rerun["failed"]) == (1, 2)
