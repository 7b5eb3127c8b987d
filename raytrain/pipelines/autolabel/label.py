"""Stages 5 and 8: the static-object gate and open-vocabulary track labels, from pooled VL features.

Static gate (stage 5): a static cluster is kept if its mean VL feature is closer to some participant prompt than to
every background prompt (by `gate_margin`); a cluster no camera sees is kept as unknown (no feature is not evidence
of background, spec trap 3). Track label (stage 8): the visible points' features averaged over the whole track,
cosines with all prompts, softmax(s / tau); the label is the argmax, and the track is dropped if a background prompt
wins. The same cosine-softmax labels boxes from the distilled point features at LiDAR-only inference (`distill.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raytrain.pipelines.autolabel.config import LabelConfig

UNKNOWN = "unknown"


@dataclass
class Prompts:
    names: list[str]  # participants first, then background
    embeddings: np.ndarray  # (Q, D) unit rows
    participants: int  # how many of `names` are participants

    @classmethod
    def encode(cls, model, cfg: LabelConfig) -> "Prompts":
        names = list(cfg.prompts) + list(cfg.background)
        return cls(names, model.encode_text(names).float().numpy(), len(cfg.prompts))


def passes_gate(feature: np.ndarray | None, prompts: Prompts, cfg: LabelConfig) -> bool:
    """Stage 5 for a static cluster: True to keep (participant-like, or unseen by any camera)."""
    if feature is None:
        return True
    cos = prompts.embeddings @ feature
    return cos[:prompts.participants].max() > cos[prompts.participants:].max() + cfg.gate_margin


def prompt_probabilities(features: np.ndarray, prompts: Prompts, tau: float) -> np.ndarray:
    """(N, D) unit features -> (N, Q) softmax over prompts of cosine / tau."""
    s = features @ prompts.embeddings.T / tau
    s -= s.max(1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(1, keepdims=True)


def track_label(feature: np.ndarray | None, prompts: Prompts, cfg: LabelConfig) -> tuple[str | None, float]:
    """(label, probability) of a track's mean feature; (None, p) when background wins, unknown when unseen."""
    if feature is None:
        return UNKNOWN, cfg.unknown_score
    p = prompt_probabilities(feature[None], prompts, cfg.tau)[0]
    k = int(p.argmax())
    return (prompts.names[k] if k < prompts.participants else None), float(p[k])
