"""Caption writers (spec 2.1 step 3): the instruction-tuned LLM through the project's generation engine, and the
deterministic template writer of spec 3.5 (tests and the closed-loop check).

A writer takes a batch of `CaptionJob`s and returns, per job, the raw reply or the exception that ended it, so one
bad request (too long for the context window, a failing model call) is counted by the caller and the rest go on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from raytrain.pipelines.ctrlsynth.prompt import chat_messages
from raytrain.pipelines.ctrlsynth.tags import Tags

LLM_BACKENDS = ("engine", "template")


@dataclass
class LLMConfig:
    backend: str = "engine"  # engine: a decoder checkpoint through raytrain.infer.Engine | template: spec 3.5 stand-in
    checkpoint: str | None = None  # engine: an instruction-tuned checkpoint with tokenizer and chat template
    temperature: float = 0.7  # spec 3.2 [U]
    top_p: float = 0.9
    max_new_tokens: int = 48
    max_batch_size: int = 16  # engine KV slots: captions decoded together
    threads: int = 1  # torch threads per LLM actor (CPU)
    omit_rate: float = 0.0  # template: probability of leaving each object out (tests the text filter)

    def __post_init__(self) -> None:
        if self.backend not in LLM_BACKENDS:
            raise ValueError(f"backend={self.backend!r}; expected one of {', '.join(LLM_BACKENDS)}")

    def check(self) -> None:
        """Called by the driver before Ray starts (a dataclass default must not need a checkpoint)."""
        if self.backend == "engine" and not self.checkpoint:
            raise ValueError("backend=engine needs checkpoint=DIR (an instruction-tuned model, e.g. "
                             "SmolLM2-135M-Instruct converted with `raytrain data make=smollm2`), or use "
                             "backend=template")


@dataclass
class CaptionJob:
    prompt: str  # the user message (prompt.caption_prompt)
    tags: Tags  # the edited tags the caption must show (the template writer reads them)
    seed: int


class CaptionWriter(Protocol):
    name: str

    def write(self, jobs: list[CaptionJob]) -> list[str | Exception]: ...


class EngineWriter:
    """Chat-templated requests, one per job, decoded together by continuous batching with per-request seeds."""

    def __init__(self, engine: Any, cfg: LLMConfig, name: str = "engine") -> None:
        self.engine, self.cfg, self.name = engine, cfg, name

    @classmethod
    def from_checkpoint(cls, cfg: LLMConfig) -> EngineWriter:
        import torch

        from raytrain.infer.engine import Engine, EngineConfig

        cuda = torch.cuda.is_available()
        engine = Engine.from_checkpoint(cfg.checkpoint, EngineConfig(max_batch_size=cfg.max_batch_size,
                                                                     max_model_len=1024),
                                        device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else None)
        return cls(engine, cfg, name=f"engine:{cfg.checkpoint}")

    def request_ids(self, prompt: str) -> list[int] | str:
        tok = self.engine.tokenizer
        if getattr(tok, "chat_template", None):
            return list(tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
        return prompt  # a base model: the plain prompt

    def write(self, jobs: list[CaptionJob]) -> list[str | Exception]:
        from raytrain.infer.engine import Request
        from raytrain.infer.sampling import SamplingParams

        out: list[str | Exception] = [RuntimeError("not run")] * len(jobs)
        ready = []
        for i, job in enumerate(jobs):
            try:
                request = Request(self.request_ids(job.prompt), SamplingParams(
                    max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                    seed=job.seed, stop=["\n\n"]))
                self.engine.encode(request)  # a request that cannot fit fails alone, before any compute
                ready.append((i, request))
            except Exception as e:  # noqa: BLE001 - counted per job by the caller
                out[i] = e
        try:
            for (i, _), completion in zip(ready, self.engine.generate([r for _, r in ready])):
                out[i] = completion.text
        except Exception as e:  # noqa: BLE001 - the batch failed: every job in it is counted as failed
            for i, _ in ready:
                out[i] = e
        return out


class TemplateWriter:
    """Spec 3.5's LLM stand-in: a deterministic caption of the tags (attributes, one relation), leaving each object
    out with probability `omit_rate` (at least one stays)."""

    name = "template-1"

    def __init__(self, omit_rate: float = 0.0) -> None:
        self.omit_rate = omit_rate

    def write(self, jobs: list[CaptionJob]) -> list[str | Exception]:
        return [self.caption(job.tags, random.Random(job.seed)) for job in jobs]

    def caption(self, tags: Tags, rng: random.Random) -> str:
        shown = [i for i in range(len(tags.objects)) if rng.random() >= self.omit_rate] or [0][:len(tags.objects)]
        if not shown:
            return "an empty picture"
        phrases = {i: f"{'an' if tags.phrase(i)[0] in 'aeiou' else 'a'} {tags.phrase(i)}" for i in shown}
        relation = next(((s, p, o) for s, p, o in tags.relations if s in phrases and o in phrases), None)
        if relation is not None:
            s, p, o = relation
            said = f"{phrases.pop(s)} {'to the ' if 'of' in p else ''}{p} {phrases.pop(o)}"
            parts = [said, *phrases.values()]
        else:
            parts = list(phrases.values())
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{body[0].upper()}{body[1:]}."


def build_writer(cfg: LLMConfig) -> CaptionWriter:
    if cfg.backend == "template":
        return TemplateWriter(cfg.omit_rate)
    return EngineWriter.from_checkpoint(cfg)
