"""SeedLM against round-to-nearest on a real pretrained model, SmolLM2-135M-Instruct: held-out perplexity at 4 and 3
bits per weight. Prints one JSON line.

Every linear weight inside the 30 blocks (106.2M weights: fused q/k/v, attention output, fused gate/up, down; the
embedding, tied head and norms stay as converted) is compressed by the library's codecs called directly on one
device (no Ray: `raytrain compress` runs the same `compress_tensor` per row range as Ray tasks), rebuilt densely and
evaluated. Variants, each with its bits per weight counted from what it stores:
- SeedLM 4-bit (C, P) = (8, 3), 4.000 bpw, and 3-bit (12, 4), 3.000 bpw (the paper's presets, exhaustive search);
- RTN with one fp16 scale per 128 weights at 4 and 3 code bits (the usual data-free baseline: 4.135 / 3.135 bpw
  here rather than 4.125 / 3.125, since the 576-wide rows are padded to whole groups),
  and per 16 weights at 3 and 2 code bits (exactly 4.000 / 3.000 bpw, equal storage).
Text (by default; `--text` picks another): the docstrings of 32 standard-library modules
(`raytrain.data.corpus.heldout_documents`, shipped with every CPython; SmolLM2's pretraining data may well contain
them, which matters for the absolute figure, not for the comparison), in windows of `--seq-len` tokens. FP is the
converted checkpoint: the dequantized Q4_1 GGUF, whose linear weights are themselves 4-bit-derived (4.0 + 1.0 bits
of fp16 scale and minimum per 32 weights), so every variant re-quantizes an already quantized model.

    python -m raytrain.checkpoint.from_gguf /tmp/smollm2 --gguf /tmp/smollm2.gguf   # the parts, joined (README)
    python benchmarks/seedlm_smollm2.py --checkpoint /tmp/smollm2 --device cuda              # H200: all 30 layers
    python benchmarks/seedlm_smollm2.py --checkpoint DIR --device cpu --layers 2 --max-tokens 4096   # CPU slice
    python benchmarks/seedlm_smollm2.py --checkpoint /tmp/smollm2 --device cuda --text embedded:heldout \
        --seq-len 64 --max-tokens 4096 --variants seedlm_4bit,seedlm_3bit,rtn_4bit_g128   # the AFM table's rows
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.checkpoint.hf import linear_weight_names, load_pretrained  # noqa: E402
from raytrain.compress import evaluate as ev  # noqa: E402
from raytrain.compress.format import compress_tensor, relative_error  # noqa: E402
from raytrain.compress.rtn import RTNConfig  # noqa: E402
from raytrain.compress.seedlm import SeedLMConfig  # noqa: E402
from raytrain.pipelines.compress import EvalConfig, heldout_windows  # noqa: E402

VARIANTS = {  # name -> (method, config)
    "seedlm_4bit": ("seedlm", SeedLMConfig.for_bits(4)),
    "rtn_4bit_g128": ("rtn", RTNConfig(bits=4, group_size=128)),
    "rtn_3bit_g16": ("rtn", RTNConfig(bits=3, group_size=16)),
    "seedlm_3bit": ("seedlm", SeedLMConfig.for_bits(3)),
    "rtn_3bit_g128": ("rtn", RTNConfig(bits=3, group_size=128)),
    "rtn_2bit_g16": ("rtn", RTNConfig(bits=2, group_size=16)),
}


def compressed_weights(original: dict[str, torch.Tensor], method: str, config: Any, device: str
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each weight compressed and rebuilt densely; and the variant's bits per weight, mean relative error, time."""
    start, dense, stored, errors = time.perf_counter(), {}, 0, []
    for name, weight in original.items():
        ct = compress_tensor(weight, method, config, device)
        dense[name] = ct.dense()
        stored += ct.stored_bytes * 8
        errors.append(relative_error(weight, dense[name]))
    seconds = time.perf_counter() - start
    weights = sum(w.numel() for w in original.values())
    stats = {"bits_per_weight": round(stored / weights, 4), "mean_relative_error": round(sum(errors) / len(errors), 5),
             "compress_seconds": round(seconds, 1)}
    if method == "seedlm":
        stats["blocks_per_s"] = round(weights / config.C / seconds)
    return dense, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the converted SmolLM2 (raytrain.checkpoint.from_gguf)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=None, help="compress only the first N blocks (a CPU slice)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--text", default=None, help="embedded:<source>, .txt or .jsonl (default: the docstrings); "
                   "embedded:heldout --seq-len 64 --max-tokens 4096 gives the windows of the AFM deployment table")
    args = p.parse_args()
    model = load_pretrained(args.checkpoint, device=args.device).model
    names = [n for n in linear_weight_names(args.checkpoint)
             if args.layers is None or int(n.split(".")[1]) < args.layers]
    params = {n: model.get_parameter(n) for n in names}
    original = {n: w.detach().cpu().clone() for n, w in params.items()}
    windows = heldout_windows(args.checkpoint, EvalConfig(text=args.text, seq_len=args.seq_len,
                                                          max_tokens=args.max_tokens), key="--text")
    vocab = model.cfg.vocab_size

    def perplexity() -> float:
        return round(ev.perplexity(model, windows, vocab, batch_size=8, device=args.device), 4)

    fp = {"bits_per_weight": 32.0, "perplexity": perplexity()}
    results = {}
    for name in args.variants.split(","):
        method, config = VARIANTS[name]
        dense, stats = compressed_weights(original, method, config, args.device)
        with torch.no_grad():
            for n, w in dense.items():
                params[n].copy_(w)
        results[name] = {**stats, "perplexity": perplexity()}
        print(json.dumps({"variant": name, **results[name]}), file=sys.stderr, flush=True)
    with torch.no_grad():
        for n, w in original.items():
            params[n].copy_(w)
    ratio = None
    if "seedlm_3bit" in results and "rtn_3bit_g128" in results:
        ratio = round(results["rtn_3bit_g128"]["perplexity"] / results["seedlm_3bit"]["perplexity"], 4)
    print(json.dumps({
        "benchmark": "seedlm_smollm2",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "config": {"checkpoint": args.checkpoint, "layers_compressed": args.layers or model.cfg.n_layers,
                   "linear_weights": sum(w.numel() for w in original.values()), "eval_tokens": windows[:, 1:].numel(),
                   "seq_len": args.seq_len, "text": args.text or "standard-library docstrings (heldout_documents)",
                   "fp_reference": "dequantized Q4_1 GGUF (already 4-bit-derived)", "torch": torch.__version__},
        "results": results, "baseline": {"fp": fp}, "ratio": ratio,
        "ratio_is": "perplexity of RTN 3-bit g128 / SeedLM 3-bit (> 1: SeedLM better)",
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
