"""Data sources and mixture weights: the embedded sources are distinct and hold out what they should; mixture
weights are validated and normalised."""

from __future__ import annotations

import re

import pytest

from raytrain.data import corpus
from raytrain.data.text import DataError, TextDataConfig, check_paths, mixture_weights

SOURCES = {"prose": "embedded:prose", "code": "embedded:code", "math": "embedded:arithmetic"}


def test_weights_are_normalised_and_absent_sources_get_zero() -> None:
    cfg = TextDataConfig(sources=SOURCES, mixture={"prose": 3.0, "math": 1.0})
    assert mixture_weights(cfg) == {"prose": 0.75, "code": 0.0, "math": 0.25}
    assert mixture_weights(TextDataConfig(sources=SOURCES)) == pytest.approx({k: 1 / 3 for k in SOURCES})


@pytest.mark.parametrize("mixture, message", [
    ({"prose": 0.0, "code": 0.0}, "must sum to a positive value"),
    ({"prose": 1.0, "code": -0.5}, "must not be negative"),
    ({"prose": 1.0, "web": 1.0}, r"mixture names \['web'\]"),
])
def test_bad_weights_are_named(mixture: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextDataConfig(sources=SOURCES, mixture=mixture)


def test_path_and_sources_exclude_each_other_and_unknown_embedded_sources_are_named() -> None:
    with pytest.raises(ValueError, match="path or sources, not both"):
        TextDataConfig(path="/corpus", sources=SOURCES)
    with pytest.raises(DataError, match="data.sources.web=embedded:web: no such embedded source"):
        check_paths(TextDataConfig(sources={"web": "embedded:web"}))


def test_embedded_sources_are_distinct_and_never_contain_held_out_topics() -> None:
    prose, code, heldout = (corpus.source(name) for name in ("prose", "code", "heldout"))
    assert len(heldout) == 10 and len(prose) + len(heldout) == 79
    trained = "\n".join(prose + code)
    for topic in heldout:
        opening = topic.split("\n\n")[0] + "\n\n" + topic.split("\n\n")[1]  # title and first paragraph
        assert opening not in trained
    assert "::=" in "\n".join(code) and "::=" not in "\n".join(prose)  # grammar rules are code


def test_arithmetic_source_is_correct_and_recall_questions_are_answered_by_their_records() -> None:
    for doc in corpus.source("arithmetic")[:20]:
        for line in doc.split("\n"):
            if match := re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", line):
                a, op, b, value = match.groups()
                assert eval(f"{a} {op} {b}") == int(value)
    for doc in corpus.source("recall")[:20]:
        records = dict(re.findall(r"the code of (\S+) is (\d+)\.", doc))
        for key, value in re.findall(r"what is the code of (\S+)\? Answer: (\d+)\.", doc):
            assert records[key] == value
    assert corpus.source("recall") == corpus.source("recall")  # generated deterministically
