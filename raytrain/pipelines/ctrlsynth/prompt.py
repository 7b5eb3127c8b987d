"""Prompts (spec 2.5: task, content, constraints) for the caption LLM and the text-to-image stage, and the
cleaning of what the LLM returns (spec trap 9)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from raytrain.pipelines.ctrlsynth.tags import Tags

EXAMPLE = ("Objects: circle, square\nAttributes: red circle, small square\nRelations: circle left of square",
           "A red circle to the left of a small square.")
_PREAMBLE = re.compile(r"^\s*(sure[,!.]?\s*)?((here is|here's|this is)[^:\n]*:|caption\s*:)\s*", re.IGNORECASE)


def content(tags: Tags) -> str:
    r = tags.readable()
    return "\n".join(f"{name.capitalize()}: {', '.join(r[name]) or 'none'}"
                     for name in ("objects", "attributes", "relations"))


def edit_instruction(edit: dict[str, str]) -> str:
    if edit["op"] == "remove":
        return f'Do not mention the {edit["what"].split()[-1] if edit["kind"] == "object" else edit["what"]}.'
    if edit["op"] == "add":
        return f'Include {edit["what"]}.'
    return f'Show {edit["to"]} instead of {edit["what"]}.'


def caption_prompt(tags: Tags, edits: list[dict[str, str]], original: str | None, max_words: int,
                   style: str = "") -> str:
    """The user message: task (with the original text to keep and every edit phrased), content, constraints."""
    task = ["Write one caption for a picture that shows the elements below."]
    if original is not None:
        task.append(f'Keep the meaning of this description: "{original}".')
    task += [edit_instruction(e) for e in edits]
    constraints = (f"One sentence, at most {max_words} words; plain descriptive style"
                   f"{f', style: {style}' if style else ''}; reply with the caption only.")
    return "\n".join([" ".join(task), content(tags), constraints])


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """One worked example before the request: small instruction models copy its form (a single plain sentence)."""
    example_prompt = caption_prompt(Tags(), [], None, 40).splitlines()
    example_prompt[1:4] = EXAMPLE[0].splitlines()
    return [{"role": "user", "content": "\n".join(example_prompt)}, {"role": "assistant", "content": EXAMPLE[1]},
            {"role": "user", "content": prompt}]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def clean_caption(text: str, max_words: int) -> str:
    """The caption inside an LLM reply: preamble, quotes and markup stripped, the first line's first sentence, at
    most `max_words` words; empty if nothing is left."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = _PREAMBLE.sub("", lines[0]).strip().lstrip('"*`\'')
    first = re.match(r"(.+?[.!?])(?=[\"*`']*(\s|$))", line)
    sentence = (first.group(1) if first else line).strip('"*`\' ')
    return " ".join(sentence.split()[:max_words])


@dataclass
class ImagePrompt:
    """What the text-to-image stage receives (spec 2.1 step 5): the caption, the tag phrases it must show, a style
    and a negative prompt. `text()` is the single prompt a diffusion model takes."""

    caption: str
    tag_phrases: list[str]
    style: str = ""
    negative: str = ""

    def text(self, max_words: int = 60) -> str:
        """Caption, tag phrases, style; cut to `max_words` words (CLIP's 77-token window, spec trap 1)."""
        parts = [self.caption.rstrip("."), ", ".join(self.tag_phrases), self.style]
        return " ".join(". ".join(p for p in parts if p).split()[:max_words])


def image_prompt(caption: str, tags: Tags, style: str, negative: str) -> ImagePrompt:
    return ImagePrompt(caption, [tags.phrase(i) for i in range(len(tags.objects))], style, negative)
