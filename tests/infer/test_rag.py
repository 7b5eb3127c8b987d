"""RAG prompts: the fork-join segments read as one sequence are the chat the naive prompt would be; document files
in both formats, and their mistakes named by file and line."""

from __future__ import annotations

import json

import pytest

from raytrain.config import ConfigError
from raytrain.infer.rag import INSTRUCTION, PLAIN_CHAT_TEMPLATE, forkjoin_prompt, read_documents


def test_the_segments_in_one_sequence_are_the_naive_chat(tokenizer) -> None:
    docs = ["The if statement selects a suite.", "  A class defines an object.\n"]
    history = [{"role": "system", "content": "Be brief."}]
    prompt = forkjoin_prompt(tokenizer, docs, "What does if do?", history=history, template=PLAIN_CHAT_TEMPLATE)
    user = f"{INSTRUCTION}\n\nThe if statement selects a suite.\n\nA class defines an object.\n\nQuestion: What does if do?\n"
    chat = tokenizer.apply_chat_template([*history, {"role": "user", "content": user}], chat_template=PLAIN_CHAT_TEMPLATE,
                                         add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(prompt.flat()) == chat
    assert len(prompt.documents) == 2 and tokenizer.decode(prompt.query) == "Question: What does if do?\n"
    assert tokenizer.decode(prompt.postamble) == "\nassistant:"


def test_document_files_in_both_formats(tmp_path) -> None:
    lines = tmp_path / "docs.jsonl"
    lines.write_text(json.dumps({"text": "Falcons fly.", "title": "Birds"}) + "\n\n" + json.dumps({"text": "Otters swim."}))
    assert read_documents(lines) == ["[Document](Title: Birds) Falcons fly.", "Otters swim."]
    text = tmp_path / "docs.txt"
    text.write_text("Document 1: one.\n\n\n\nDocument 2: two\nlines.\n")
    assert read_documents(text) == ["Document 1: one.", "Document 2: two\nlines."]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": ', r"docs\.jsonl:2: not valid JSON"),
    ('{"title": "t"}', r"docs\.jsonl:1: expected an object with a non-empty string field `text`"),
    ('{"text": "a", "title": 5}', r"docs\.jsonl:1: field `title` must be a string"),
    ("\n\n", r"rag\.documents: .*docs\.jsonl holds no documents"),
])
def test_document_file_mistakes_are_named(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_documents(path)
    with pytest.raises(ConfigError, match=r"rag\.documents: cannot read"):
        read_documents(tmp_path / "missing.txt")
