"""The embedded default corpus: real English that ships with every CPython.

`pydoc_data.topics` holds the Python Language Reference sections that `help("if")`, `help("assignment")` and so
on print: 79 documents, about 465,000 characters of English technical prose (Python Software Foundation License).
It needs no download, so `make run` trains on it anywhere.
"""

from __future__ import annotations


def documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


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
