"""Training throughput and MFU of a raytrain decoder beside a Hugging Face `LlamaForCausalLM` of matching size.

Single device: the same training step (bf16 autocast forward, fp32 cross-entropy + z-loss, backward, fused AdamW)
on both models with the same batch, timed after warm-up; prints one JSON line with the raytrain figures, the
baseline's and their ratio. The raytrain model runs as the trainer runs it with `trainer.compile=true`.

    python benchmarks/train_throughput.py --device cuda --model openelm_1_1b --batch 16 --seq 2048

Two GPUs (`--parallel`, under torchrun): DeepSpeed ZeRO-2 (bf16) against plain DDP (bf16 autocast), same model
and per-GPU batch:

    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --device cuda --model openelm_270m --parallel
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.models.decoder import DecoderConfig, training_flops_per_token  # noqa: E402
from raytrain.models.registry import build_model, model_config  # noqa: E402
from raytrain.train.config import ObjectiveConfig, OptimConfig, TrainerConfig  # noqa: E402
from raytrain.train.engine import apply_model_options, deepspeed_config, loss_function  # noqa: E402
from raytrain.train.optim import build_optimizer  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
PEAK_TFLOPS = {"cuda": 989.0}  # H100/H200 dense bf16


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="openelm_270m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--parallel", action="store_true", help="ZeRO-2 vs DDP; run under torchrun")
    p.add_argument("--raytrain-only", action="store_true", help="skip the Hugging Face baseline (ray_scaling.py)")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of one raytrain step to stderr")
    args = p.parse_args()
    cfg = model_config(OmegaConf.load(CONF / f"{args.model}.yaml"))
    (parallel if args.parallel else single)(args, cfg)


def single(args: argparse.Namespace, cfg: DecoderConfig) -> None:
    device = torch.device(args.device)
    batch = random_batch(args, cfg.rows, device)
    torch.manual_seed(0)
    ours = build_model(cfg, device)
    options = TrainerConfig(compile=not args.no_compile)
    apply_model_options(ours, options)
    step = autocast_step(ours, ours, batch, device, loss_function(options, ObjectiveConfig()))
    result = timed(step, args, device)
    if args.profile:
        profile(step)
    result.update(mfu(result, training_flops_per_token(cfg, args.seq), args.device),
                  params=ours.param_counts()["params_total"])
    del ours
    free(device)
    if args.raytrain_only:
        emit(args, cfg, result, None, None)
        return

    llama = hf_llama_like(cfg).to(device)
    baseline = timed(autocast_step(llama, lambda t: llama(input_ids=t).logits, batch, device), args, device)
    baseline.update(mfu(baseline, hf_flops_per_token(llama, args.seq), args.device),
                    params=sum(p.numel() for p in llama.parameters()))
    emit(args, cfg, result, {"model": "transformers LlamaForCausalLM (sdpa, not compiled)", **baseline},
         result["tokens_per_s"] / baseline["tokens_per_s"])


def random_batch(args: argparse.Namespace, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), device=device)
    return tokens[:, :-1], tokens[:, 1:]


def autocast_step(model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                  batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                  loss_fn: Callable | None = None) -> Callable[[], None]:
    """One training step: bf16 autocast forward, fp32 loss, backward, fused AdamW on fp32 weights."""
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4), fused=device.type == "cuda")
    inputs, labels = batch
    loss_fn = loss_fn or loss_function(TrainerConfig(compile=False), ObjectiveConfig())  # eager lm_loss + z-loss

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(inputs)
        loss, *_ = loss_fn(logits, labels, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Mean tokens/s over `steps` timed training steps after `warmup` untimed ones (compilation included there), and
    this process's CPU time per step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    sync(device)
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    out = {"tokens_per_s": args.steps * args.batch * args.seq / elapsed, "step_s": elapsed / args.steps,
           "cpu_s_per_step": cpu_s / args.steps, "warmup_s": warmup_s}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def hf_llama_like(cfg: DecoderConfig) -> torch.nn.Module:
    """A standard Llama of the same width, depth, head size and vocabulary (d_model / head_dim query heads, GQA
    4:1, tied embeddings) whose FFN width gives the same non-embedding parameter count within one 64-wide step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d, hd, n = cfg.d_model, cfg.head_dim, cfg.n_layers
    heads = d // hd
    attention = d * (heads + 2 * heads // 4) * hd + heads * hd * d
    non_embedding = build_model(cfg, "meta").param_counts()["params_non_embedding"]
    ffn = round((non_embedding / n - attention - 2 * d) / (3 * d) / 64) * 64
    config = LlamaConfig(vocab_size=cfg.rows, hidden_size=d, intermediate_size=ffn, num_hidden_layers=n,
                         num_attention_heads=heads, num_key_value_heads=heads // 4, head_dim=hd,
                         max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=True, rms_norm_eps=cfg.norm_eps, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def hf_flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """The same count as `training_flops_per_token`: with tied embeddings every parameter but the norm gains
    multiplies activations once (the embedding as the output head)."""
    c = model.config
    weights = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    return 6 * weights + 12 * seq * c.num_hidden_layers * c.num_attention_heads * c.head_dim


def mfu(result: dict[str, float], flops_per_token: float, device: str) -> dict[str, float]:
    peak = PEAK_TFLOPS.get(device)
    return {"mfu": result["tokens_per_s"] * flops_per_token / (peak * 1e12)} if peak else {}


def parallel(args: argparse.Namespace, cfg: DecoderConfig) -> None:
    import deepspeed
    from torch.nn.parallel import DistributedDataParallel

    deepspeed.init_distributed("nccl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    trainer_cfg = TrainerConfig(compile=not args.no_compile, micro_batch_size=args.batch, zero_stage=2)
    inputs, labels = random_batch(args, cfg.rows, device)
    loss_fn = loss_function(trainer_cfg, ObjectiveConfig())

    torch.manual_seed(0)
    model = build_model(cfg, device)
    apply_model_options(model, trainer_cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, OptimConfig(lr=1e-4), fused=True),
        config=deepspeed_config(trainer_cfg, "bf16"))

    def zero2_step() -> None:  # what the trainer's loop does per micro-batch
        loss, *_ = loss_fn(engine(inputs), labels, None)
        engine.backward(loss)
        engine.step()

    zero2 = timed(zero2_step, args, device)
    del engine, model
    free(device)

    torch.manual_seed(0)
    model = build_model(cfg, device)
    apply_model_options(model, trainer_cfg)
    ddp = DistributedDataParallel(model, device_ids=[device.index])
    plain_ddp = timed(autocast_step(ddp, ddp, (inputs, labels), device, loss_fn), args, device)
    if rank == 0:
        flops = training_flops_per_token(cfg, args.seq)
        results = [{**r, **mfu(r, flops, "cuda"), "tokens_per_s": r["tokens_per_s"] * world, "gpus": world}
                   for r in (zero2, plain_ddp)]
        emit(args, cfg, {"mode": "deepspeed zero-2, bf16", **results[0]},
             {"mode": "torch DDP, bf16 autocast", **results[1]}, results[0]["tokens_per_s"] / results[1]["tokens_per_s"])
    torch.distributed.destroy_process_group()


def profile(step: Callable[[], None]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), file=sys.stderr)


def free(device: torch.device) -> None:
    """Release the previous model's memory and compiled graphs, so the next model compiles all of its own."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def emit(args: argparse.Namespace, cfg: DecoderConfig, results: dict, baseline: dict | None,
         ratio: float | None) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(json.dumps({"benchmark": "train_throughput", "device": device,
                      "config": {"model": cfg.name, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                                 "compile": not args.no_compile, "parallel": args.parallel,
                                 "torch": torch.__version__},
                      "results": results, "baseline": baseline, "ratio": ratio,
                      "command": " ".join([Path(sys.executable).name, *sys.argv])}))


if __name__ == "__main__":
    main()
