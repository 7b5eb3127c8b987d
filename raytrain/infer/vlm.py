"""Answering questions about images with the vision-language model (`raytrain/models/vlm.py`).

A batch of prompts is prefilled in one `VLM.forward` that fills a `VLMCache`, whose layers keep their own token sets
(with Victor, the layers after the drop hold no visual entries: their KV is N_b entries shorter per row), then each
new token is one `VLM.decode` step over every layer's own cache, sampled by the engine's `SamplingTable` (greedy,
temperature, top-k, top-p, repetition penalty, per-request seeds, as in `raytrain generate`).

This is a loop of its own beside the continuous-batching engine (`engine.py`): the engine's slot cache gives every
layer of a sequence the same length, and a VLM request carries an image besides token ids, so serving it there would
need a per-request decoding mode in the engine; the prompts of one call are batched together instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raytrain.infer.sampling import SamplingParams, SamplingTable
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
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
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
