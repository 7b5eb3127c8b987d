"""The cost of one adastar optimizer step beside torch AdamW on the same parameters (no DeepSpeed).

On CUDA adastar runs its two fused Triton kernels (`raytrain/train/adastar_kernels.py`), AdamW torch's fused kernel;
on CPU both run foreach ops. Three steps are timed in turn, repeat after repeat (so a busy machine slows them
alike): AdamW; adastar as it runs in training, where the engine has computed the global gradient norm and clipped
the gradients before any optimizer sees them (the same for AdamW, which therefore gets no clipping here either);
and adastar standalone, computing that norm itself and clipping (one more read of the gradients and a host sync).
`--foreach` also times adastar's foreach form on CUDA (the form before the kernels), `--flat` adastar on one flat
tensor holding all parameters with their layout, as under ZeRO (one rank, no communication).

    python benchmarks/adastar_step.py --device cuda --model afm_3b --foreach     # ~1 min on an H200
    OMP_NUM_THREADS=1 python benchmarks/adastar_step.py --device cpu --model afm_tiny

Prints one JSON line; ratio = adastar (as in training) / AdamW step time, ratio_standalone = adastar standalone /
AdamW.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import synced_seconds  # noqa: E402
from raytrain.cli import CONF_DIR  # noqa: E402
from raytrain.models.registry import build_model, model_config  # noqa: E402
from raytrain.train.config import OptimConfig  # noqa: E402
from raytrain.train.engine import contiguous_layout  # noqa: E402
from raytrain.train.optim import AdaStar, build_optimizer  # noqa: E402

ADASTAR = OptimConfig(name="adastar", lr=0.01, betas=[0.95, 0.95], eps=1e-30, weight_decay=3.16e-4,
                      decay_norms=True, mup_base_dim=768, skip_grad_norm=100.0)
ADAMW = OptimConfig(name="adamw", lr=0.01, betas=[0.95, 0.95], weight_decay=0.0316, decay_norms=True)


def timed(steps: dict[str, Callable[[], None]], device: str, repeats: int) -> dict[str, float]:
    """Median milliseconds of each step, after two warm-up calls each; the steps take turns in every repeat."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step(), step()
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(1e3 * synced_seconds(step, device))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def in_training(optimizer: AdaStar) -> AdaStar:
    """adastar as DeepSpeed runs it: the global norm comes from the engine, which clipped the gradients."""
    optimizer.attach(lambda: 1.0, {})
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="afm_tiny")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--foreach", action="store_true", help="also time adastar's foreach form on CUDA")
    parser.add_argument("--flat", action="store_true")
    args = parser.parse_args()
    cfg = model_config(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    model = build_model(cfg, args.device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3

    steps = {"adamw_ms": build_optimizer(model, ADAMW, fused=args.device == "cuda").step,
             "adastar_ms": in_training(build_optimizer(model, ADASTAR)).step,
             "adastar_standalone_ms": build_optimizer(model, ADASTAR, grad_clip=1.0).step}
    results = {"params": sum(p.numel() for p in params), "tensors": len(params),
               **timed(steps, args.device, args.repeats)}
    del steps
    if args.foreach and args.device == "cuda":
        foreach = in_training(build_optimizer(model, ADASTAR))
        foreach.fused = False
        results.update(timed({"adastar_foreach_ms": foreach.step}, args.device, args.repeats))
        del foreach
    if args.flat:
        numels = [p.numel() for p in params]
        offsets = [sum(numels[:k]) for k in range(len(numels))]
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
        flat.grad = torch.cat([p.grad.reshape(-1) for p in params])
        del model, params
        opt = AdaStar([flat], lr=0.01, weight_decay=3.16e-4)
        opt.attach(lambda: 1.0, {flat: contiguous_layout(offsets, numels, flat.numel(), 0)})
        results.update(timed({"adastar_flat_ms": opt.step}, args.device, args.repeats))
    adamw = results.pop("adamw_ms")
    print(json.dumps({"benchmark": "adastar_step", "device": args.device,
                      "config": {"model": args.model, "repeats": args.repeats, "flat": args.flat,
                                 "adastar": "fused Triton" if args.device == "cuda" else "foreach",
                                 "adamw": "fused" if args.device == "cuda" else "foreach"},
                      "results": results, "baseline": {"adamw_ms": adamw},
                      "ratio": results["adastar_ms"] / adamw,
                      "ratio_standalone": results["adastar_standalone_ms"] / adamw,
                      "command": "python benchmarks/adastar_step.py " + " ".join(sys.argv[1:])}))


if __name__ == "__main__":
    main()
