"""The procedural multi-document QA task: determined answers, controllable length, the `raytrain data` command."""

from __future__ import annotations

import json
import random
import re

from raytrain.data.retrieval import (RetrievalConfig, _words, document_set, eval_records, example, multihop_question,
                                     multihop_set, training_texts)
from tests.conftest import raytrain_at_once


def test_every_asked_code_is_stated_once_in_exactly_one_document() -> None:
    for record in eval_records(20, RetrievalConfig(words=800), seed=3):
        key = re.search(r"What is the code of the (.+)\?", record["prompt"]).group(1)
        docs = record["prompt"].split("\n\nQuestion:")[0].split("\n\n")
        holders = [d for d in docs if f"The code of the {key} is" in d]
        assert len(holders) == 1
        assert f"The code of the {key} is{record['answer']}." in holders[0]
        assert record["prompt"].endswith("\nAnswer:") and re.fullmatch(r" \d{4}", record["answer"])


def test_prompt_length_follows_the_word_budget() -> None:
    filler = _words()
    lengths = {w: len(example(random.Random(0), RetrievalConfig(words=w), filler)[0].split()) for w in (500, 4000)}
    assert 400 < lengths[500] <= 600 and 3600 < lengths[4000] <= 4200


def test_training_text_appends_answered_questions() -> None:
    text = next(training_texts(1, RetrievalConfig(words=600, questions=3), seed=0))
    answers = re.findall(r"What is the code of the (.+)\?\nAnswer: (\d{4})", text)
    assert len(answers) == 3 and all(f"The code of the {k} is {v}." in text for k, v in answers)


def test_data_command_writes_the_task(tmp_path) -> None:
    out, bad = raytrain_at_once(["data", "make=retrieval", f"out={tmp_path}", "retrieval.train=5", "retrieval.eval=2",
                                 "retrieval.eval_words=[400]"], ["data", "make=nope", f"out={tmp_path / 'nope'}"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["records"] == {"train.jsonl": 5, "eval_400.jsonl": 2}
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 5
    assert bad.returncode == 2 and "make='nope' is unknown" in bad.stderr


def test_document_sets_and_two_hop_chains_are_determined() -> None:
    cfg, filler = RetrievalConfig(words=20 * 28, max_words=50 * 28, filler_words=20, facts_per_doc=1), _words()
    docs, facts = document_set(random.Random(1), cfg, filler)
    assert 20 <= len(docs) <= 50 and len({k for k, _ in facts}) == len(facts)
    assert all(sum(f"The code of the {k} is {v}." in d for d in docs) == 1 for k, v in facts)
    docs, chains = multihop_set(random.Random(2), cfg, filler)
    assert len(docs) == 2 * len(chains) >= 20
    for key, owner, value, owner_doc, code_doc in chains:
        assert f"The owner of the {key} is the {owner}." in docs[owner_doc]
        assert f"The code of the {owner} is {value}." in docs[code_doc]
        assert sum(key in d for d in docs) == 1 and sum(f"the {owner} is" in d for d in docs) == 1
    assert multihop_question("jade lantern") == "What is the code of the owner of the jade lantern?"
