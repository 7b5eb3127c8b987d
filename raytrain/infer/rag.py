"""RAG prompts: documents and a question as fork-join segments in the model's chat format, and document files.

The layout is the official superposition flows' (an instruction, the documents, then `Question: ...`), put through
the model's chat template: the user turn reads

    {instruction}\\n\\n{document 1}\\n\\n ... {document n}\\n\\nQuestion: {question}\\n

and the segments are cut from the rendered template: the preamble is everything before the documents (the system
turn, the start of the user turn, the instruction), each document is a path, the query is the question line and the
postamble is the rest (the end of the user turn, the assistant header). Each segment is tokenized on its own, so
naive RAG (the same segments read as one sequence) and superposition see exactly the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raytrain.config import ConfigError, RaytrainError
from raytrain.infer.forkjoin import ForkJoinPrompt

INSTRUCTION = "Use the documents below to answer the question. Answer with the exact value the documents give."
# For tokenizers without a chat template (raytrain's own BPE): one "role: content" line per message.
PLAIN_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")
_SLOT = "\x00"  # where the user turn's content goes in the rendered template


def chat_template(tokenizer: Any, configured: str | None = None) -> str:
    """The template to render chats with: the configured one, else the tokenizer's, else the plain one."""
    return configured or getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def forkjoin_prompt(tokenizer: Any, documents: list[str], question: str, instruction: str | None = None,
                    history: list[dict[str, str]] | None = None, template: str | None = None) -> ForkJoinPrompt:
    """The segments of a RAG prompt: `history` (earlier chat messages, e.g. a system turn) precedes the user turn
    that holds the instruction (default INSTRUCTION), the documents and the question."""
    instruction = instruction or INSTRUCTION
    messages = [*(history or []), {"role": "user", "content": _SLOT}]
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer, template),
                                         add_generation_prompt=True, tokenize=False)
    before, slot, after = text.partition(_SLOT)
    if not slot:
        raise RaytrainError("the chat template does not render the user message's content")

    def encode(piece: str) -> list[int]:
        return tokenizer.encode(piece, add_special_tokens=False)

    return ForkJoinPrompt(encode(f"{before}{instruction}\n\n"), [encode(f"{d.strip()}\n\n") for d in documents],
                          encode(f"Question: {question.strip()}\n"), encode(after))


def read_documents(path: str | Path, key: str = "rag.documents") -> list[str]:
    """Documents from a file: JSON lines (`{"text": ..., "title": ...}`, title optional, written as the paper's
    `[Document](Title: ...) text`), or plain text with documents separated by blank lines. Errors name `key` (the
    setting that gave the path) or the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {path} ({e})") from None
    if path.suffix == ".jsonl":
        documents = [_document(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        documents = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not documents:
        raise ConfigError(f"{key}: {path} holds no documents")
    return documents


def _document(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
        raise ConfigError(f"{where}: expected an object with a non-empty string field `text`")
    title = record.get("title")
    if title is not None and not isinstance(title, str):
        raise ConfigError(f"{where}: field `title` must be a string")
    return f"[Document](Title: {title}) {record['text']}" if title else record["text"]
