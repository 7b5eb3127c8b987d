"""The embedded text: real English that ships with every CPython, plus procedural sources for data mixtures.

`pydoc_data.topics` holds the Python Language Reference sections that `help("if")`, `help("assignment")` and so
on print: 79 documents, about 465,000 characters of English technical prose (Python Software Foundation License).
It needs no download, so `make run` trains on it anywhere.

For mixtures (`data.sources`, paths `embedded:<name>`) it is split into distinct sources, and two are generated:

    prose       the topics' running text (paragraphs that are not indented), one document per topic
    code        their indented blocks (grammar rules and code examples), dedented, one document per topic
    arithmetic  generated sums, differences and products written out in words and symbols (a "math" source)
    recall      generated key-value records followed by questions about them (synthetic long-context QA)
    heldout     every 8th topic, whole; prose and code use only the other topics, so this is never trained on

`heldout_documents()` is text that no model trained on the whole of `documents()` has seen: standard-library
docstrings (the evaluation text of `raytrain compress`).
"""

from __future__ import annotations

import random
import re
import textwrap

HELDOUT_EVERY = 8
SOURCES = ("prose", "code", "arithmetic", "recall", "heldout")
_WORDS = ("amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "jade", "kelp", "lumen",
          "maple", "nectar", "onyx", "pebble", "quartz", "raven", "sierra", "tundra", "umber", "violet", "willow",
          "yarrow", "zephyr")


def documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def source(name: str) -> list[str]:
    """The documents of embedded source `name` (one of SOURCES)."""
    topics = documents()
    train = [doc for i, doc in enumerate(topics) if i % HELDOUT_EVERY]
    if name == "heldout":
        return [doc for i, doc in enumerate(topics) if i % HELDOUT_EVERY == 0]
    if name in ("prose", "code"):
        split = [_split_code(doc) for doc in train]
        return [parts[name == "code"] for parts in split if parts[name == "code"].strip()]
    if name == "arithmetic":
        return [_arithmetic(random.Random(seed)) for seed in range(240)]
    if name == "recall":
        return [_recall(random.Random(seed)) for seed in range(300)]
    raise KeyError(name)


def _split_code(doc: str) -> tuple[str, str]:
    """(prose, code) of a topic: paragraphs whose every line is indented are code."""
    prose, code = [], []
    for para in re.split(r"\n\s*\n", doc):
        lines = [line for line in para.split("\n") if line.strip()]
        if lines and all(line.startswith("   ") for line in lines):
            code.append(textwrap.dedent(para))
        else:
            prose.append(para)
    return "\n\n".join(prose), "\n\n".join(code)


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(30):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        words = {"+": "The sum of {a} and {b} is {v}.", "-": "{a} minus {b} leaves {v}.",
                 "*": "{a} times {b} makes {v}."}[op]
        lines.append(rng.choice([f"{a} {op} {b} = {value}", words.format(a=a, b=b, v=value)]))
    return "\n".join(lines)


def _recall(rng: random.Random) -> str:
    keys = rng.sample([f"{x}-{y}" for x in _WORDS for y in _WORDS if x != y], 12)
    values = {k: rng.randint(1000, 9999) for k in keys}
    records = [f"Record {i + 1}: the code of {k} is {values[k]}." for i, k in enumerate(keys)]
    questions = [f"Question: what is the code of {k}? Answer: {values[k]}." for k in rng.sample(keys, 3)]
    return "\n".join(records + questions)


HELDOUT_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
                   "decimal", "difflib", "email.message", "functools", "heapq", "http.client", "inspect", "itertools",
                   "json", "logging", "pathlib", "pickle", "re", "shlex", "socket", "sqlite3", "string", "subprocess",
                   "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile")


def heldout_documents() -> list[str]:
    """Text no model trained on `documents()` has seen: the docstrings of a fixed list of standard-library modules
    (each module's own and its public classes' and functions'), one document per module, in a fixed order."""
    import importlib
    import inspect

    docs = []
    for name in HELDOUT_MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) and \
                    getattr(obj, "__module__", None) == module.__name__:
                parts.append(inspect.getdoc(obj) or "")
        docs.append("\n\n".join(p for p in parts if p))
    return docs
