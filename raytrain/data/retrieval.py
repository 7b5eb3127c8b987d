"""A procedural long-context retrieval task: multi-document question answering with one relevant document.

Each example is a set of documents. Every document mixes a few key-value facts ("The code of the silver falcon is
4821.") with filler prose cut from the embedded corpus; the key asked about appears in exactly one document, and
every key is unique within an example, so the answer is determined. The prompt ends with
`Question: What is the code of the silver falcon?\nAnswer:` and the answer is ` 4821`. Prompt length grows with the
number of documents, so the same generator gives 500-token and 8000-token prompts.

Training text (`train.jsonl`, field `text`) appends several question/answer pairs about facts of its documents, so
each sequence carries several supervised answers; evaluation records (`eval.jsonl`) hold `prompt`, `answer`, the asked
`key` and the approximate length in words.

`document_set` gives the documents as a list (RAG over separate documents, e.g. superposition prompting), and
`multihop_set` a two-hop variant: one document names a key's owner ("The owner of the silver falcon is the jade
lantern."), another the owner's code, and the question asks for the code of the owner.
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
    docs, facts = document_set(rng, cfg, filler)
    return "\n\n".join(docs), facts


def document_set(rng: random.Random, cfg: RetrievalConfig,
                 filler: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """([document, ...], [(key, value), ...] of all facts in them); each key is stated in exactly one document."""
    n_docs = _n_docs(rng, cfg)
    keys = rng.sample(_all_keys(), n_docs * cfg.facts_per_doc)
    facts = [(k, str(rng.randrange(1000, 10000))) for k in keys]
    per = cfg.facts_per_doc
    sentences = [[f"The code of the {k} is {v}." for k, v in facts[d * per:(d + 1) * per]] for d in range(n_docs)]
    return _documents(rng, cfg, filler, sentences), facts


def multihop_set(rng: random.Random, cfg: RetrievalConfig,
                 filler: list[str]) -> tuple[list[str], list[tuple[str, str, str, int, int]]]:
    """Documents of two-hop chains, in random order: for each chain, one document states "The owner of the {key} is
    the {owner}." and another "The code of the {owner} is {value}.". Returns the documents and, per chain, (key,
    owner, value, index of the owner document, index of the code document)."""
    n_chains = max(1, _n_docs(rng, cfg) // 2)
    names = rng.sample(_all_keys(), 2 * n_chains)
    chains = [(names[2 * i], names[2 * i + 1], str(rng.randrange(1000, 10000))) for i in range(n_chains)]
    sentences = [s for key, owner, value in chains
                 for s in ([f"The owner of the {key} is the {owner}."], [f"The code of the {owner} is {value}."])]
    order = list(range(len(sentences)))
    rng.shuffle(order)
    docs = _documents(rng, cfg, filler, [sentences[i] for i in order])
    where = {old: new for new, old in enumerate(order)}
    return docs, [(k, o, v, where[2 * i], where[2 * i + 1]) for i, (k, o, v) in enumerate(chains)]


def multihop_question(key: str) -> str:
    return f"What is the code of the owner of the {key}?"


def _n_docs(rng: random.Random, cfg: RetrievalConfig) -> int:
    words = rng.randint(cfg.words, cfg.max_words) if cfg.max_words else cfg.words
    return max(2, words // (cfg.filler_words + 8 * cfg.facts_per_doc))


def _all_keys() -> list[str]:
    return [f"{a} {n}" for a in ADJECTIVES for n in NOUNS]


def _documents(rng: random.Random, cfg: RetrievalConfig, filler: list[str], sentences: list[list[str]]) -> list[str]:
    """One document per sentence list: the sentences around a random cut of filler prose."""
    docs = []
    for d, facts in enumerate(sentences):
        start = rng.randrange(len(filler) - cfg.filler_words)
        prose = " ".join(filler[start:start + cfg.filler_words])
        cut = rng.randrange(len(facts) + 1)
        docs.append(f"Document {d + 1}: " + " ".join([*facts[:cut], prose, *facts[cut:]]))
    return docs


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
