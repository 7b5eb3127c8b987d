"""The cost of one adastar optimizer step beside torch AdamW on the same parameters (no DeepSpeed).

adastar works tensor by tensor (its update clip reduces over each whole tensor), so its step is a loop of small
kernels; AdamW is torch's fused kernel on CUDA (foreach on CPU). `--flat` also times adastar on one flat tensor
holding all parameters with their layout, as under ZeRO (one rank, no communication).

    python benchmarks/adastar_step.py --device cuda --model afm_3b
    python benchmarks/adastar_step.py --device cpu --model afm_tiny

Prints one JSON line; ratio = adastar step time / AdamW step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from raytrain.cli import CONF_DIR
from raytrain.models.registry import build_model, model_config
from raytrain.train.config import OptimConfig
from raytrain.train.engine import contiguous_layout
from raytrain.train.optim import AdaStar, build_optimizer

ADASTAR = OptimConfig(name="adastar", lr=0.01, betas=[0.95, 0.95], eps=1e-30, weight_decay=3.16e-4,
                      decay_norms=True, mup_base_dim=768, skip_grad_norm=100.0)
ADAMW = OptimConfig(name="adamw", lr=0.01, betas=[0.95, 0.95], weight_decay=0.0316, decay_norms=True)


def timed(step: Callable[[], None], device: str, repeats: int) -> float:
    """Median seconds of `step` after two warm-up calls."""
    step(), step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="afm_tiny")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--flat", action="store_true")
    args = parser.parse_args()
    cfg = model_config(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    model = build_model(cfg, args.device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3

    results = {"params": sum(p.numel() for p in params), "tensors": len(params)}
    adastar = build_optimizer(model, ADASTAR, grad_clip=1.0)
    results["adastar_ms"] = 1e3 * timed(adastar.step, args.device, args.repeats)
    del adastar
    adamw = build_optimizer(model, ADAMW, fused=args.device == "cuda")
    results["adamw_ms"] = 1e3 * timed(adamw.step, args.device, args.repeats)
    del adamw
    if args.flat:
        numels = [p.numel() for p in params]
        offsets = [sum(numels[:k]) for k in range(len(numels))]
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
        flat.grad = torch.cat([p.grad.reshape(-1) for p in params])
        del model, params
        opt = AdaStar([flat], lr=0.01, weight_decay=3.16e-4)
        opt.attach(lambda: 1.0, {flat: contiguous_layout(offsets, numels, flat.numel(), 0)})
        results["adastar_flat_ms"] = 1e3 * timed(opt.step, args.device, args.repeats)
    print(json.dumps({"benchmark": "adastar_step", "device": args.device,
                      "config": {"model": args.model, "repeats": args.repeats, "flat": args.flat},
                      "results": {k: v for k, v in results.items() if k != "adamw_ms"},
                      "baseline": {"adamw_ms": results["adamw_ms"]},
                      "ratio": results["adastar_ms"] / results["adamw_ms"],
                      "command": "python benchmarks/adastar_step.py " + " ".join(sys.argv[1:])}))


if __name__ == "__main__":
    main()
