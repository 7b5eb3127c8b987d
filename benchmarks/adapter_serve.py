"""The engine serving many LoRA adapters on one base (what a Serve replica runs for `model="base:adapter"`): the same
requests through a plain engine on the base (baseline), through the adapter engine (K slots) without adapter,
spread over K adapters with K slots (one continuous batch mixing adapters row by row), and over the same adapters
with one slot (the queue groups them: a request waits until no other adapter runs; one timed run).

Whether the mixing is correct, for the first 4 requests of each of the first two adapters: greedy tokens of the mixed
run against the same requests on each adapter alone (`Engine.from_checkpoint(..., adapter=...)`, the unbatched LoRA
path), free-running (`mixed_greedy_tokens_equal_to_adapter_alone`: one flipped near-tie changes every later token,
so in bf16 on random weights, whose logits are nearly flat, it falls far below 1 with correct mixing); and teacher
forced, which does not compound: the adapter-alone model scores the mixed run's tokens in one forward, and
`mixed_tokens_argmax_of_own_adapter` is the share of them that are its argmax. Two references from the same run
calibrate it: `base_tokens_argmax_of_base` (the plain engine's tokens under the base model: the precision's noise
floor, no adapter anywhere) and `mixed_tokens_argmax_of_other_adapter` (the same tokens under the other adapter: a
wrong adapter's figure). Correct mixing puts the first at the noise floor and far above the control; the
`*_max_logit_gap` figures are the largest (argmax logit - chosen token's logit), against
`reference_logit_std`.

`decode_step` isolates one decode step of `--max-batch-size` rows from prefill and scheduling, on the plain engine's
model (`base`), on the adapter engine's with no row on an adapter (`no_adapter`) and with row i on slot i mod K
(`mixed`): `aten_ops`, the work of an eager step (the lowest-level ATen ops in a CPU profile, views excluded), and
`ms`, the step as the engine runs it (a CUDA graph replay on the GPU; median of 10).

    python benchmarks/adapter_serve.py --device cuda            # AFM-3B shapes, 8 of 26 layers, bf16, CUDA graphs
    python benchmarks/adapter_serve.py --device cpu --model afm_tiny --requests 16 --prompt 32 --new 16 \
        --max-batch-size 8 --adapters 4

Random weights (a checkpoint and K adapters written to a temporary directory), prompts of `--prompt` random token
ids, exactly `--new` tokens each (`ignore_eos`). Prints one JSON line: tokens/s per mode (end to end, prefill
included, median of `--repeats` runs after a warm-up run that captures the graphs), baseline (the plain engine on the
base), ratios. One torch thread on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from benchmarks.timing import median_seconds, synced_seconds  # noqa: E402
from raytrain.checkpoint.adapter import base_fingerprint, save_adapter  # noqa: E402
from raytrain.checkpoint.hf import load_pretrained, model_state, read_model_config, save_pretrained  # noqa: E402
from raytrain.cli import CONF_DIR  # noqa: E402
from raytrain.data.corpus import documents  # noqa: E402
from raytrain.data.tokenizer import to_files, train_bpe  # noqa: E402
from raytrain.infer.engine import Engine, EngineConfig, Request  # noqa: E402
from raytrain.infer.model_runner import ModelRunner  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.models.decoder import build_decoder  # noqa: E402
from raytrain.models.lora import LoRAConfig, adapter_state, apply_lora, lora_layers  # noqa: E402
from raytrain.models.registry import model_config  # noqa: E402


def write(root: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """A random base checkpoint and `--adapters` random adapters of it."""
    preset = model_config(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"))
    cfg = dataclasses.replace(preset, n_layers=min(args.layers or preset.n_layers, preset.n_layers))
    torch.manual_seed(0)
    model = build_decoder(cfg)
    base = save_pretrained(root / "base", cfg, model_state(model), to_files(train_bpe(documents()[:50], 512)))
    lora, fingerprint, adapters = LoRAConfig(rank=args.rank), base_fingerprint(base), {}
    apply_lora(model, lora)
    for k in range(args.adapters):
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(std=0.02)
        adapters[f"a{k}"] = save_adapter(root / f"a{k}", adapter_state(model), lora, base, fingerprint)
    return base, adapters


def run(engine: Engine, jobs: list[tuple[list[int], str | None]], new: int, warmup: int | None = None,
        repeats: int = 1) -> tuple[float, list[list[int]]]:
    """(tokens/s, each request's tokens) of `generate` over all jobs (median of `repeats` runs), after a warm-up run
    of the first `warmup` jobs (all by default: every batch width's graph is captured before the timed runs)."""
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    requests = [Request(prompt, params, adapter=adapter) for prompt, adapter in jobs]
    engine.generate(requests[:warmup])
    outputs: list[list] = []
    seconds = [synced_seconds(lambda: outputs.append(engine.generate(requests)), engine.device)
               for _ in range(repeats)]
    return len(jobs) * new / statistics.median(seconds), [c.token_ids for c in outputs[-1]]


NOT_WORK = {"aten::view", "aten::as_strided", "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select",
            "aten::transpose", "aten::t", "aten::expand", "aten::permute", "aten::unsqueeze", "aten::squeeze",
            "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::detach", "aten::alias",
            "aten::unflatten", "aten::flatten", "aten::_unsafe_view", "aten::lift_fresh", "aten::empty",
            "aten::empty_strided", "aten::unbind", "aten::result_type", "aten::to", "aten::view_as", "aten::expand_as",
            "aten::contiguous", "aten::resolve_conj", "aten::resolve_neg", "aten::scalar_tensor"}


def aten_ops(fn: Callable[[], object]) -> int:
    """ATen ops that do work in one call of `fn`: profiled ops outside NOT_WORK none of whose descendants is one
    (so a matmul counts once, as its kernel, and a no-op cast not at all)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()

    def works(event: object) -> bool:
        return event.name not in NOT_WORK or any(works(child) for child in event.cpu_children)

    return sum(e.name not in NOT_WORK and not any(works(c) for c in e.cpu_children) for e in profile.events())


def decode_step(engine: Engine, slots: list[int], length: int) -> dict[str, float]:
    """`aten_ops` and `ms` (see the module docstring) of a decode step of `engine`'s model, len(slots) rows on
    adapter slots `slots` (-1: none), attending to `length` keys, its decode attention as the engine's."""
    selection = engine.adapters.selection if engine.adapters is not None else None

    def runner(cuda_graphs: bool) -> ModelRunner:
        built = ModelRunner(engine.model, len(slots), length, cuda_graphs=cuda_graphs, selection=selection,
                            fused_attention=engine.runner.cache.fused_attention is not None)
        if selection is not None:
            built.select_adapters(slots)
        return built

    eager, engine_like = runner(False), runner(True)
    eager.decode(len(slots), length)  # lazy initialisation
    step = median_seconds(lambda: engine_like.decode(len(slots), length), engine.device, repeats=10)
    return {"aten_ops": aten_ops(lambda: eager.decode(len(slots), length)), "ms": 1e3 * step}


@torch.inference_mode()
def logit_gaps(model: torch.nn.Module, jobs: list[tuple[list[int], list[int]]], device: str) -> tuple[torch.Tensor,
                                                                                                       float]:
    """(argmax logit - chosen token's logit) of `model` at every generated token of each (prompt, tokens), teacher
    forced (one forward over prompt + tokens); and the median std of those logits."""
    gaps, stds = [], []
    for prompt, tokens in jobs:
        x = torch.tensor([prompt + tokens[:-1]], device=device)
        logits = model(x)[0, len(prompt) - 1:, :model.cfg.vocab_size].float()  # (new, V)
        chosen = logits.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
        gaps.append(logits.max(-1).values - chosen)
        stds.append(logits.std(-1))
    return torch.cat(gaps).cpu(), torch.cat(stds).median().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="afm_3b")
    parser.add_argument("--layers", type=int, default=8, help="of the preset's layers (0: all)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median; grouped: one)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # a shared CPU: a second thread mostly waits for its turn at every op
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    config = EngineConfig(max_batch_size=args.max_batch_size, max_model_len=args.prompt + args.new,
                          max_step_tokens=max(512, args.prompt))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (args.prompt,), generator=generator).tolist() for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = write(Path(tmp), args)
        layers = read_model_config(base).n_layers
        names = [f"a{i % args.adapters}" for i in range(args.requests)]

        def engine(slots: int = 0, adapter: Path | None = None) -> Engine:
            return Engine.from_checkpoint(base, config, args.device, dtype, adapter=adapter,
                                          adapters=adapters if slots else None, adapter_slots=slots or 1)

        plain_engine = engine()
        base_tok_s, plain = run(plain_engine, [(p, None) for p in prompts], args.new, repeats=args.repeats)
        mixed_engine = engine(args.adapters)
        width, length = args.max_batch_size, args.prompt + args.new
        steps = {"base": decode_step(plain_engine, [-1] * width, length)}
        for mode, slots in (("no_adapter", [-1] * width), ("mixed", [i % args.adapters for i in range(width)])):
            steps[mode] = decode_step(mixed_engine, slots, length)
        del plain_engine
        no_adapter_tok_s, _ = run(mixed_engine, [(p, None) for p in prompts], args.new, repeats=args.repeats)
        mixed_tok_s, mixed = run(mixed_engine, list(zip(prompts, names)), args.new, repeats=args.repeats)
        rows = mixed_engine.decode_rows
        del mixed_engine
        grouped_engine = engine(1)
        # one request at a time: adapters alternate and the queue head waits for the other adapter's sequence
        grouped_tok_s, _ = run(grouped_engine, list(zip(prompts, names)), args.new, warmup=2)
        loads = grouped_engine.adapters.loads
        del grouped_engine
        same = total = 0
        checked = {name: [i for i, n in enumerate(names) if n == name][:4] for name in ("a0", "a1")[:args.adapters]}
        for name, mine in checked.items():
            _, alone = run(engine(adapter=adapters[name]), [(prompts[i], None) for i in mine], args.new)
            same += sum(a == b for i, want in zip(mine, alone) for a, b in zip(mixed[i], want))
            total += len(mine) * args.new

        def gaps(adapter: Path | None, requests: list[int], tokens: list[list[int]]) -> tuple[torch.Tensor, float]:
            model = load_pretrained(base, device=args.device, dtype=dtype, adapter=adapter).model.eval()
            return logit_gaps(model, [(prompts[i], tokens[i]) for i in requests], args.device)

        own = torch.cat([gaps(adapters[name], mine, mixed)[0] for name, mine in checked.items()])
        everyone = [i for mine in checked.values() for i in mine]
        floor, std = gaps(None, everyone, plain)
        other = {"a0": "a1", "a1": "a0"}
        wrong = torch.cat([gaps(adapters[other[name]], mine, mixed)[0] for name, mine in checked.items()
                           if name in other and other[name] in adapters])
    print(json.dumps({
        "benchmark": "adapter_serve", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "config": {"model": args.model, "layers": layers, "adapters": args.adapters, "rank": args.rank,
                   "requests": args.requests, "prompt_tokens": args.prompt, "new_tokens": args.new,
                   "max_batch_size": args.max_batch_size, "dtype": str(dtype),
                   "cuda_graphs": args.device == "cuda", "cpu_threads": torch.get_num_threads(),
                   "rows": "request i uses adapter i mod adapters"},
        "results": {"base_tokens_per_s": base_tok_s, "adapter_engine_no_adapter_tokens_per_s": no_adapter_tok_s,
                    "mixed_tokens_per_s": mixed_tok_s,
                    "grouped_one_slot_tokens_per_s": grouped_tok_s, "grouped_adapter_loads": loads,
                    "mixed_mean_decode_rows": sum(k * v for k, v in rows.items()) / sum(rows.values()),
                    "mixed_greedy_tokens_equal_to_adapter_alone": same / total,
                    "mixed_tokens_argmax_of_own_adapter": (own == 0).float().mean().item(),
                    "base_tokens_argmax_of_base": (floor == 0).float().mean().item(),
                    "mixed_tokens_argmax_of_other_adapter": (wrong == 0).float().mean().item() if len(wrong) else None,
                    "mixed_max_logit_gap_own_adapter": own.max().item(), "base_max_logit_gap": floor.max().item(),
                    "reference_logit_std": std, "decode_step": steps},
        "baseline": {"base_tokens_per_s": base_tok_s},
        "ratio": {"mixed_over_base": mixed_tok_s / base_tok_s, "mixed_over_grouped": mixed_tok_s / grouped_tok_s,
                  "adapter_engine_no_adapter_over_base": no_adapter_tok_s / base_tok_s,
                  "decode_step_ms_mixed_over_base": steps["mixed"]["ms"] / steps["base"]["ms"],
                  "decode_step_ms_no_adapter_over_base": steps["no_adapter"]["ms"] / steps["base"]["ms"]},
        "command": "python benchmarks/adapter_serve.py " + " ".join(sys.argv[1:]),
    }))


if __name__ == "__main__":
    main()
