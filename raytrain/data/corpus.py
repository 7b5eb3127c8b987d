"""The embedded default corpus: real English that ships with every CPython.

`pydoc_data.topics` holds the Python Language Reference sections that `help("if")`, `help("assignment")` and so
on print: 79 documents, about 465,000 characters of English technical prose (Python Software Foundation License).
It needs no download, so `make run` trains on it anywhere.
"""

from __future__ import annotations


def documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]
