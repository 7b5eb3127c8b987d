"""Where the postamble's last token looks, under the Prompt Cache baseline's graph and under superposition's (every
path kept), on SmolLM2 and the single-hop question sets of `benchmarks/superposition.py`: the attention it pays (mean
over layers and heads) to the documents' first tokens, to the preamble and to the sequence's first token.

    python benchmarks/superposition_attention.py --checkpoint /tmp/smollm2 --sets 10 --doc-words 28

Why: the Prompt Cache computes each document alone, so every document's first token is a sequence's first token to the
model; this measures whether the query then spends its attention on those tokens (as a model does on its first
token) rather than on the preamble. Both graphs run as one sequence under their masks (`forkjoin`'s oracles), CPU.
Prints one JSON line; `baseline` is superposition's figures, from the same questions.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.superposition import INSTRUCTION, question_sets  # noqa: E402
from raytrain.checkpoint.hf import load_pretrained  # noqa: E402
from raytrain.infer.forkjoin import Layout, MaskedAttention, oracle_layout, prompt_cache_layout  # noqa: E402
from raytrain.infer.rag import forkjoin_prompt  # noqa: E402
from raytrain.models.decoder import Decoder  # noqa: E402

GRAPHS = {"prompt_cache": prompt_cache_layout, "superposition_all_paths": oracle_layout}


class LastRowAttention(MaskedAttention):
    """The masked single-sequence attention, recording per layer the last row's attention probabilities (H, N)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask)
        self.rows: list[torch.Tensor] = []

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        keys = k.repeat_interleave(q.shape[1] // k.shape[1], 1)  # grouped KV heads, one per query head
        scores = (q[0, :, -1:].float() @ keys[0].float().transpose(-1, -2))[:, 0] / math.sqrt(q.shape[-1])
        self.rows.append(scores.masked_fill(~self.mask[0, :, -1], float("-inf")).softmax(-1))
        return super().update(layer, q, k, v)


@torch.inference_mode()
def attention_shares(model: Decoder, layout: Layout, groups: dict[str, list[int]]) -> dict[str, float]:
    """The last token's attention on each group of columns, summed over the group, mean over layers and heads."""
    probe = LastRowAttention(layout.mask)
    device = model.embed.weight.device
    model(torch.tensor([layout.tokens], device=device), cache=probe,
          positions=layout.positions.to(device=device, dtype=torch.float32)[None])
    return {name: statistics.mean(float(row[:, cols].sum(-1).mean()) for row in probe.rows)  # heads differ by layer
            for name, cols in groups.items()}


def groups_of(layout: Layout, documents: int) -> dict[str, list[int]]:
    preamble = layout.spans["preamble", 0]
    return {"document_first_tokens": [layout.spans["document", i].start for i in range(documents)],
            "preamble": list(range(preamble.start, preamble.stop)), "sequence_first_token": [0]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="/tmp/smollm2")
    p.add_argument("--sets", type=int, default=10, help="single-hop document sets, one question each")
    p.add_argument("--doc-words", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrained = load_pretrained(args.checkpoint)
    model, tokenizer = pretrained.model.eval(), pretrained.tokenizer
    shares: dict[str, list[dict[str, float]]] = {name: [] for name in GRAPHS}
    documents = []
    for docs, asked in question_sets(args.sets, 1, False, args.seed, args.doc_words):
        prompt = forkjoin_prompt(tokenizer, docs, asked[0]["question"], INSTRUCTION)
        documents.append(len(docs))
        for name, graph in GRAPHS.items():
            layout = graph(prompt)
            shares[name].append(attention_shares(model, layout, groups_of(layout, len(docs))))
    means = {name: {key: statistics.mean(r[key] for r in rows) for key in rows[0]} for name, rows in shares.items()}
    baseline = means.pop("superposition_all_paths")
    print(json.dumps({"benchmark": "superposition_attention", "device": "cpu",
                      "config": {"checkpoint": args.checkpoint, "sets": args.sets, "doc_words": args.doc_words,
                                 "seed": args.seed, "documents_per_question": statistics.mean(documents),
                                 "token": "the postamble's last (the first answer token's logits)",
                                 "share": "attention summed over the group, mean over layers and heads"},
                      "results": means, "baseline": {"superposition_all_paths": baseline},
                      "ratio": means["prompt_cache"]["document_first_tokens"] / baseline["document_first_tokens"],
                      "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
