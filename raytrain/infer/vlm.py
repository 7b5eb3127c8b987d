"""Answering questions about images with the vision-language model (`raytrain/models/vlm.py`).

A batch of prompts is prefilled in one `VLM.forward` that fills a `VLMCache`, whose layers keep their own token sets
(with Victor, the layers after the drop hold no visual entries: their KV is N_b entries shorter per row), then each
new token is one `VLM.decode` step over every layer's own cache, sampled by the engine's `SamplingTable` (greedy,
temperature, top-k, top-p, repetition penalty, per-request seeds, as in `raytrain generate`).

This is a loop of its own beside the continuous-batching engine (`engine.py`): the engine's slot cache gives every
layer of a sequence the same length, and a VLM request carries an image besides token ids, so serving it there would
need a per-request decoding mode in the engine; the prompts of one call are batched together instead. `VLMEngine`
gives Serve replicas the engine's surface over this loop.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from raytrain.infer.engine import Completion, Delta
from raytrain.infer.sampling import SamplingParams, SamplingTable
from raytrain.models.kv_cache import use_inference_attention
from raytrain.models.vlm import IGNORE, VLM, VLMBatch, VLMCache


@dataclass
class VLMRequest:
    """A prompt around one image: `before` ids, the image, `after` ids (no image: a text-only prompt)."""

    before: list[int]
    after: list[int]
    image: torch.Tensor | None = None  # (3, H, W) pixels in [0, 1]
    params: SamplingParams | None = None  # None: greedy, 16 new tokens
    visual: torch.Tensor | None = None  # or the image's projected visual tokens (N, d), the tower skipped

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.visual is not None

    @property
    def prompt(self) -> list[int]:
        """The prompt's text token ids (the image not counted)."""
        return [*self.before, *self.after]


def collate(rows: list[tuple[list[int], list[int], list[int] | None]], pad_id: int, left: bool,
            device: torch.device | str = "cpu") -> VLMBatch:
    """(before ids, after ids, labels or None) per row -> a VLMBatch without images, padded on the left or right;
    the image span goes between `before` and `after` (rows whose `before` is None are text-only)."""
    length = max(len(before or []) + len(after) for before, after, _ in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    text_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    image_at = torch.full((len(rows),), -1, dtype=torch.long)
    for b, (before, after, label) in enumerate(rows):
        ids = [*(before or []), *after]
        start = length - len(ids) if left else 0
        tokens[b, start:start + len(ids)] = torch.tensor(ids)
        text_mask[b, start:start + len(ids)] = True
        if label is not None:
            labels[b, start:start + len(ids)] = torch.tensor(label)
        if before is not None:
            image_at[b] = start + len(before)
    with_labels = any(label is not None for *_, label in rows)
    return VLMBatch(tokens.to(device), text_mask.to(device), image_at.to(device),
                    labels=labels.to(device) if with_labels else None)


@torch.inference_mode()
def generate(model: VLM, requests: list[VLMRequest], eos_id: int | None, pad_id: int) -> list[list[int]]:
    """Generated token ids of each request (EOS not included), all requests in one batch."""
    device = model.decoder.embed.weight.device
    if device.type == "cuda":
        use_inference_attention()
    params = [r.params or SamplingParams(max_new_tokens=16, temperature=0.0) for r in requests]
    batch = collate([(r.before, r.after, None) if r.has_image else (None, [*r.before, *r.after], None)
                     for r in requests], pad_id, left=True, device=device)
    computed = visual_tokens(model, [r.image if r.visual is None else None for r in requests], device)
    batch.visual = [r.visual if r.visual is not None else v for r, v in zip(requests, computed)]
    widest = max((len(v) for v in batch.visual if v is not None), default=0)
    longest = max(p.max_new_tokens for p in params)
    cache = VLMCache(len(model.decoder.layers), batch.tokens.shape[1] + widest + model.cfg.victor.registers
                     + longest + 1)
    out = model(batch, cache)
    rows = torch.arange(len(requests), device=device)
    logits = model.decoder.logits(out.hidden[rows, out.tokens.last()])  # (B, V)
    table = SamplingTable(len(requests), model.cfg.decoder.vocab_size, device)
    for b, (request, p) in enumerate(zip(requests, params)):
        seed = p.seed if p.seed is not None else random.getrandbits(64)
        table.assign(b, p, seed, [*request.before, *request.after])
    outputs: list[list[int]] = [[] for _ in requests]
    running = [True] * len(requests)
    for _ in range(longest):
        tokens = table.sample(logits)
        for b, token in enumerate(tokens.tolist()):
            if not running[b]:
                continue
            if token == eos_id and not params[b].ignore_eos:
                running[b] = False
                continue
            outputs[b].append(token)
            running[b] = len(outputs[b]) < params[b].max_new_tokens
        if not any(running):
            break
        logits = model.decode(tokens, cache)
    return outputs


def visual_tokens(model: VLM, images: list[torch.Tensor | None], device: torch.device) -> list[torch.Tensor | None]:
    """Each image's projected visual tokens; images of one size go through the tower together."""
    present = [img for img in images if img is not None]
    if present and all(img.shape == present[0].shape for img in present):
        stacked = iter(model.visual_tokens(torch.stack(present).to(device)))
        return [next(stacked) if img is not None else None for img in images]
    return [model.visual_tokens(img[None].to(device))[0] if img is not None else None for img in images]


def pixels(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) pixels in [0, 1], prepared as for training (centred square, resized)."""
    from raytrain.data.vqa import decode_image
    from raytrain.models.vit import to_pixels

    return to_pixels(torch.from_numpy(decode_image(data, size))[None])[0]


def answer(model: VLM, tokenizer: Any, questions: list[str], images: list[torch.Tensor | None],
           params: SamplingParams | None = None, template: str = "auto") -> list[str]:
    """Answers to questions about images, prompted as in training (`raytrain.data.vqa`)."""
    from raytrain.data.vqa import prompt_ids, template_of

    kind = template_of(tokenizer, template)
    requests = [VLMRequest(*prompt_ids(tokenizer, q, kind), image, params) for q, image in zip(questions, images)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate(model, requests, tokenizer.eos_token_id, pad)]


IMAGE_TOKEN = -200  # LLaVA's IMAGE_TOKEN_INDEX: where the image goes in a prompt's token ids


class VLMEngine:
    """The generation engine's surface (`astream`, `tokenize`, `tokenizer`, `context_window`) for a VLM, so a Serve
    replica can hold one. A prompt's token ids hold `IMAGE_TOKEN` where its image goes (`chat_ids` renders chat
    messages so); `request` pairs them with the image. Each `astream` call's requests are generated together by
    `generate` in the engine's one worker thread, a call at a time (no continuous batching across calls), and the
    answer arrives as one delta."""

    def __init__(self, model: VLM, tokenizer: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.cfg
        self.context_window = cfg.decoder.max_seq_len - cfg.visual_tokens - cfg.victor.registers
        self.steps, self.decode_rows = 0, Counter()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm")

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", dtype: torch.dtype | None = None,
                        tokenizer: str | None = None) -> VLMEngine:
        from raytrain.checkpoint.hf import load_pretrained
        from raytrain.config import RaytrainError

        pretrained = load_pretrained(path, device=device, dtype=dtype, tokenizer=tokenizer)
        if pretrained.tokenizer is None:
            raise RaytrainError(f"{pretrained.path} has no tokenizer files; pass a tokenizer directory")
        return cls(pretrained.model, pretrained.tokenizer)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Text gets BOS prepended; token ids are used as given (IMAGE_TOKEN allowed once)."""
        from raytrain.config import RaytrainError

        text = isinstance(prompt, str)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if text else list(prompt)
        if text and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        vocab = self.model.cfg.vocab_size
        if not ids or any(not (0 <= t < vocab or t == IMAGE_TOKEN) for t in ids) or ids.count(IMAGE_TOKEN) > 1:
            raise RaytrainError(f"prompt token ids must be integers in [0, {vocab}), with at most one image")
        return ids

    def chat_ids(self, messages: list[dict[str, str]], chat_template: str) -> list[int]:
        """Messages (an image's place marked by `raytrain.data.vqa.IMAGE` in its content) through the chat template,
        tokenized around the image."""
        from raytrain.data.vqa import IMAGE

        text = self.tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                                  tokenize=False)
        before, *after = text.split(IMAGE)
        encode = lambda part: self.tokenizer.encode(part, add_special_tokens=False)  # noqa: E731
        return [*encode(before), *([IMAGE_TOKEN, *encode(after[0])] if after else [])]

    def request(self, ids: list[int], params: SamplingParams, image: bytes | None) -> VLMRequest:
        """A request of token ids holding IMAGE_TOKEN exactly when `image` (encoded bytes) is given."""
        from raytrain.config import RaytrainError
        from raytrain.data.vqa import IMAGE

        at = ids.index(IMAGE_TOKEN) if IMAGE_TOKEN in ids else None
        if at is None and image is not None:
            raise RaytrainError("the prompt has no place for its image")
        if at is not None and image is None:
            raise RaytrainError(f"the text holds the image placeholder {IMAGE} but the request has no image")
        if image is None:
            return VLMRequest(ids, [], None, params)
        try:
            picture = pixels(image, self.model.cfg.image.image_size)
        except Exception as e:  # PIL raises many types for bad data
            raise RaytrainError(f"the image does not decode ({type(e).__name__})") from None
        return VLMRequest(ids[:at], ids[at + 1:], picture, params)

    async def astream(self, requests: list[VLMRequest]) -> AsyncIterator[list[Delta]]:
        import asyncio

        start = time.perf_counter()
        outputs = await asyncio.get_running_loop().run_in_executor(
            self._worker, generate, self.model, requests, self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.steps += 1
        self.decode_rows[len(requests)] += 1
        yield [self._completion(i, r, ids, time.perf_counter() - start)
               for i, (r, ids) in enumerate(zip(requests, outputs))]

    def _completion(self, index: int, request: VLMRequest, ids: list[int], seconds: float) -> Delta:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        reason = "stop" if len(ids) < request.params.max_new_tokens else "length"
        cut = min((text.find(s) for s in request.params.stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Delta(index, text, Completion(text, ids, reason, len(request.prompt), seconds))
