"""benchmarks/victor_vqa.py's `--local` recipe and scoring: the training rows wrap around when the steps need more
of them, `train_tower` decides whether the image tower learns, and the answer prior and per-kind scores are what
answering without the image would get, with intervals around them; victor_8_pooled selects pooled registers on the
Ray and `--local` paths."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raytrain.data import vqa
from raytrain.data.tokenizer import to_files, train_bpe
from raytrain.models.registry import build_model
from raytrain.models.vlm import VictorConfig
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("victor_vqa", REPO / "benchmarks" / "victor_vqa.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [vqa.record(i, 0, vqa.VQADataConfig().world) for i in range(3)]


@pytest.mark.parametrize("train_tower", [False, True])
def test_local_training_wraps_the_rows_and_trains_the_tower_only_when_asked(records, train_tower) -> None:
    files = to_files(train_bpe((f"Question: {r['question']}\nAnswer: {r['answer']}" for r in records * 20), 512))
    recipe = {"steps": 2, "batch_size": 4, "lr": 1e-3, "train_tower": train_tower}  # 8 rows asked of 3
    model, cpu_s, loss = bench.fit_local({"num_registers": 8}, files, records, recipe)
    torch.manual_seed(0)  # the start every variant shares
    start = build_model(dataclasses.replace(model.cfg, victor=VictorConfig(mode="off"))).state_dict()
    tower_moved = any(not torch.equal(p, start[f"image.{n}"]) for n, p in model.image.named_parameters())
    decoder_moved = any(not torch.equal(p, start[f"decoder.{n}"]) for n, p in model.decoder.named_parameters())
    assert tower_moved == train_tower and decoder_moved
    assert cpu_s > 0 and loss > 0


def test_answer_prior_is_each_kinds_most_frequent_training_answer() -> None:
    train = [{"kind": "count", "answer": "2"}] * 3 + [{"kind": "count", "answer": "1"},
                                                      {"kind": "colour", "answer": "Red."}]
    rows = [{"kind": "count", "answer": "2"}, {"kind": "count", "answer": "3"}, {"kind": "colour", "answer": "red"},
            {"kind": "size", "answer": "small"}]  # a kind no training row has is never right
    prior = bench.answer_prior(train, rows)
    assert prior["exact_match"] == 0.5
    assert {k: (c["em"], c["n"]) for k, c in prior["per_kind"].items()} == {
        "colour": (1.0, 1), "count": (0.5, 2), "size": (0.0, 1)}
    for em, (low, high) in [(prior["exact_match"], prior["ci95"]),
                            *((c["em"], c["ci95"]) for c in prior["per_kind"].values())]:
        assert 0 <= low <= em <= high <= 1 and high - low > 0.3  # 1 to 4 rows: wide intervals


@pytest.mark.parametrize("variants", [["baseline", "victor_32"], ["victor_8"]])
def test_variants_must_include_the_baseline_and_victor_8(monkeypatch, variants) -> None:
    monkeypatch.setattr("sys.argv", ["victor_vqa.py", "--data", "DIR", "--tower", "RUN", "--storage", "DIR",
                                     "--variants", *variants])
    with pytest.raises(SystemExit) as exited:  # refused before any data is read or run trained
        bench.main()
    assert exited.value.code == 2


def test_ray_path_trains_only_the_variants_asked(monkeypatch, capsys) -> None:
    trained = []
    monkeypatch.setattr(bench, "heldout", lambda args: [{"kind": "count", "answer": "1"}] * 2)
    monkeypatch.setattr(bench, "pretrain_decoder", lambda args: Path("decoder"))
    monkeypatch.setattr(bench, "train_variant", lambda name, extra, decoder, args: trained.append((name, extra))
                        or Path(name))
    monkeypatch.setattr(bench, "training_answers", lambda data: [{"kind": "count", "answer": "1"}])
    monkeypatch.setattr(bench, "read_model_config", lambda path: SimpleNamespace(victor=VictorConfig(drop_layer=3)))
    monkeypatch.setattr(bench, "evaluate", lambda path, rows, victor, batch: {
        **bench.scores(rows, [True, False]), "hits": [True, False], "checkpoint": str(path)})
    monkeypatch.setattr("sys.argv", ["victor_vqa.py", "--data", "DIR", "--tower", "RUN", "--storage", "DIR",
                                     "--variants", "baseline", "victor_8"])
    bench.main()
    assert trained == [("baseline", ["vlm.mode=off"]), ("victor_8", ["vlm.registers=8"])]
    line = json.loads(capsys.readouterr().out)
    assert set(line["results"]) == {"victor_8", "fastv_8"} and line["results"]["victor_8"]["minus_baseline"] == 0
    assert line["answer_prior"]["exact_match"] == 1  # "1", the kind's most frequent training answer, is right


@pytest.mark.parametrize("init", ["pooled", "image_token"])
def test_register_init_variants_select_their_init_on_both_paths(init: str) -> None:
    """victor_8_<init>'s overrides reach model.victor through job=vlm's `vlm.*` keys (the Ray path), its LOCAL entry
    builds the same Victor block, and victor_8 keeps the default learned registers."""
    from raytrain.models.registry import model_config

    name = f"victor_8_{init}"
    victor = {n: model_config(bench.compose(["job=vlm", *bench.TRAINED[n]]).model).victor for n in ("victor_8", name)}
    assert (victor[name].register_init, victor[name].num_registers) == (init, 8)
    assert victor["victor_8"].register_init == "normal"
    assert VictorConfig(**bench.LOCAL[name]) == victor[name]
