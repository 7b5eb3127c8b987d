"""What serving many LoRA adapters costs: one forward over a batch whose rows use different adapters
(`raytrain.models.lora.LoRALinear`: a decode batch runs every slot in two dense matmuls, a prefill batch of fewer rows
than slots gathers each row's A and B) against the same batch on one adapter, on the bare base, and grouped (one
forward per adapter over its rows), at a decode-like and a prefill-like shape. The bank is in the model's dtype, as
a server's (`AdapterSlots`).

    python benchmarks/lora_batch.py --device cuda [--model afm_3b] [--layers 8] [--adapters 8] [--rank 16]

AFM-3B's shapes (d 3072, 24/8 heads, FFN 8064) with `--layers` of its 26 layers, bf16 on GPU (fp32 on CPU), adapters
with random weights on every attention and FFN projection. Prints one JSON line: tokens/s per mode and shape,
baseline (the bare base), ratio (mixed adapters / one adapter, and grouped / one adapter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from raytrain.cli import CONF_DIR  # noqa: E402
from raytrain.models.decoder import build_decoder  # noqa: E402
from raytrain.models.lora import LoRAConfig, apply_lora, lora_layers  # noqa: E402
from raytrain.models.registry import model_config  # noqa: E402



@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="afm_3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--prefill", default="8x512", help="batch x tokens")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    preset = model_config(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    cfg = dataclasses.replace(preset, n_layers=args.layers)
    torch.manual_seed(0)
    model = build_decoder(cfg, args.device).to(dtype).eval()
    prefill_batch, prefill_tokens = (int(x) for x in args.prefill.split("x"))
    shapes = {"decode": (args.decode_batch, 1), "prefill": (prefill_batch, prefill_tokens)}
    inputs = {k: torch.randint(0, cfg.vocab_size, s, device=args.device) for k, s in shapes.items()}

    base = {k: median_seconds(lambda t=t: model(t), args.device, args.repeats) for k, t in inputs.items()}
    selection = apply_lora(model, LoRAConfig(rank=args.rank), slots=args.adapters, dtype=dtype)
    for layer in lora_layers(model).values():
        layer.lora_B.normal_(std=0.01)
        layer.scale.fill_(2.0)
    results = {}
    for k, tokens in inputs.items():
        rows = tokens.shape[0]
        mixed_ids = torch.arange(rows, device=args.device) % args.adapters

        def mixed(tokens: torch.Tensor = tokens, ids: torch.Tensor = mixed_ids) -> None:
            with selection.rows(ids):
                model(tokens)

        def grouped(tokens: torch.Tensor = tokens, ids: torch.Tensor = mixed_ids) -> None:
            for slot in range(args.adapters):
                picked = ids == slot
                with selection.rows(ids[picked]):
                    model(tokens[picked])

        seconds = {"base": base[k], "one_adapter": median_seconds(lambda t=tokens: model(t), args.device, args.repeats),
                   "mixed": median_seconds(mixed, args.device, args.repeats),
                   "grouped": median_seconds(grouped, args.device, args.repeats)}
        results[k] = {f"{mode}_tokens_per_s": tokens.numel() / s for mode, s in seconds.items()}
    print(json.dumps({
        "benchmark": "lora_batch", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "config": {"model": args.model, "layers": args.layers, "adapters": args.adapters, "rank": args.rank,
                   "dtype": str(dtype), "shapes": {k: list(s) for k, s in shapes.items()},
                   "rows": "row i uses adapter i mod adapters"},
        "results": results,
        "baseline": {k: {"base_tokens_per_s": v["base_tokens_per_s"]} for k, v in results.items()},
        "ratio": {k: {"mixed_over_one_adapter": v["mixed_tokens_per_s"] / v["one_adapter_tokens_per_s"],
                      "grouped_over_one_adapter": v["grouped_tokens_per_s"] / v["one_adapter_tokens_per_s"],
                      "one_adapter_over_base": v["one_adapter_tokens_per_s"] / v["base_tokens_per_s"]}
                  for k, v in results.items()},
        "command": "python benchmarks/lora_batch.py " + " ".join(sys.argv[1:]),
    }))


if __name__ == "__main__":
    main()
