"""A procedural long-context retrieval task: multi-document question answering with one relevant document.

Each example is a set of documents. Every document mixes a few key-value facts ("The code of the silver falcon is
4821.") with filler prose cut from the embedded corpus; the key asked about appears in exactly one document, and
every key is unique within an example, so the answer is determined. The prompt ends with
`Question: What is the code of the silver falcon?\nAnswer:` and the answer is ` 4821`. Prompt length grows with the
number of documents, so the same generator gives 500-token and 8000-token prompts.

Training text (`train.jsonl`, field `text`) appends several question/answer pairs about facts of its documents, so
each sequence carries several supervised answers; evaluation records (`eval.jsonl`) hold `prompt`, `answer`, the asked
`key` and the approximate length in words.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raytrain.data import corpus

ADJECTIVES = ("amber azure bronze crimson golden ivory jade silver scarlet violet copper emerald frosty quiet rapid "
              "hollow ancient brave calm distant gentle hidden lucky mighty northern proud rusty sleepy swift wild"
              ).split()
NOUNS = ("falcon harbor lantern meadow otter quarry raven saddle tower willow badger canyon dolphin ember forest "
         "glacier heron island jackal kettle lynx mirror nectar orchard pepper river sparrow thistle valley walrus"
         ).split()


@dataclass
class RetrievalConfig:
    words: int = 1500  # approximate prompt length in words (tokens are ~1.3x words with a small BPE)
    max_words: int | None = None  # training: each example's length is drawn from [words, max_words]
    facts_per_doc: int = 3
    filler_words: int = 60  # prose words per document
    questions: int = 4  # question/answer pairs appended to each training example


def _words() -> list[str]:
    return " ".join(corpus.documents()).split()


def example(rng: random.Random, cfg: RetrievalConfig, filler: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """(documents text, [(key, value), ...] of all facts in it)."""
    doc_words = cfg.filler_words + 8 * cfg.facts_per_doc
    words = rng.randint(cfg.words, cfg.max_words) if cfg.max_words else cfg.words
    n_docs = max(2, words // doc_words)
    keys = rng.sample([f"{a} {n}" for a in ADJECTIVES for n in NOUNS], n_docs * cfg.facts_per_doc)
    facts = [(k, str(rng.randrange(1000, 10000))) for k in keys]
    docs = []
    for d in range(n_docs):
        start = rng.randrange(len(filler) - cfg.filler_words)
        sentences = [f"The code of the {k} is {v}." for k, v in facts[d * cfg.facts_per_doc:(d + 1) * cfg.facts_per_doc]]
        prose = " ".join(filler[start:start + cfg.filler_words])
        cut = rng.randrange(len(sentences) + 1)
        docs.append(f"Document {d + 1}: " + " ".join([*sentences[:cut], prose, *sentences[cut:]]))
    return "\n\n".join(docs), facts


def question(key: str) -> str:
    return f"\n\nQuestion: What is the code of the {key}?\nAnswer:"


def training_texts(n: int, cfg: RetrievalConfig, seed: int) -> Iterator[str]:
    rng, filler = random.Random(seed), _words()
    for _ in range(n):
        docs, facts = example(rng, cfg, filler)
        asked = rng.sample(facts, min(cfg.questions, len(facts)))
        yield docs + "".join(f"{question(k)} {v}" for k, v in asked)


def eval_records(n: int, cfg: RetrievalConfig, seed: int) -> Iterator[dict[str, str | int]]:
    rng, filler = random.Random(seed), _words()
    for _ in range(n):
        docs, facts = example(rng, cfg, filler)
        key, value = rng.choice(facts)
        yield {"prompt": docs + question(key), "answer": f" {value}", "words": cfg.words, "key": key}


def write_jsonl(path: Path, records: Iterator[dict]) -> int:
    """Write atomically (a temporary file renamed into place); returns the number of records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    count = 0
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    tmp.replace(path)
    return count
