"""CatLIP vs CLIP with the same ViT, in one run.

`--device cuda`: training step time and images/s of CatLIP (ViT-B/16 + 24,320-way BCE) against CLIP (the same
ViT-B/16 + a 12-layer text tower + InfoNCE) on synthetic batches, bf16 autocast, fused AdamW. Under
`torchrun --nproc_per_node 2` both run data-parallel (DDP) and CLIP gathers the features of both GPUs.

`--device cpu`: accuracy after equal wall-clock time on the procedural world: tiny CatLIP and tiny CLIP train for
`--seconds` each on the same images and captions, then a linear probe on their frozen image features classifies
the shapes of held-out one-object images; CatLIP's held-out multi-label mAP is reported too.

Prints one JSON line: {"benchmark", "device", "config", "results", "baseline", "ratio", "command"}; the baseline is
CLIP and the ratio is CatLIP over CLIP (throughput on GPU, probe accuracy on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.data import imagetext, shapes, synsets  # noqa: E402
from raytrain.data.tokenizer import train_bpe  # noqa: E402
from raytrain.models.clip import ClipConfig, build_clip  # noqa: E402
from raytrain.models.decoder import DecoderConfig  # noqa: E402
from raytrain.models.vit import ViTConfig, build_vit, to_pixels  # noqa: E402
from raytrain.train.metrics import linear_probe_accuracy, mean_average_precision  # noqa: E402
from raytrain.train.objectives import info_nce, multilabel_bce  # noqa: E402

VIT_B16 = ViTConfig(name="vit_b16")
VIT_TINY = ViTConfig(name="vit_tiny", d_model=96, n_layers=4, n_heads=3, ffn_dim=384, image_size=64, pos_grid=4)
TEXT_TINY = DecoderConfig(name="text_tiny", vocab_size=512, d_model=96, n_layers=2, head_dim=32, q_heads=3,
                          kv_heads=3, ffn_dim=256, max_seq_len=32, tie_embeddings=False)


# ---- GPU: throughput -------------------------------------------------------------------------------------------

def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def gpu(args: argparse.Namespace) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    B = args.batch
    images = torch.rand(B, 3, 224, 224, device=device)
    targets = (torch.rand(B, VIT_B16.num_classes, device=device) < 5 / VIT_B16.num_classes).float()
    tokens = torch.randint(0, 49408, (B, 77), device=device)
    lengths = torch.randint(8, 78, (B,), device=device)

    def trainer(model, loss_fn):
        model = model.to(device)
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    results = {}
    for name, build, loss_fn in (
            ("catlip", lambda: build_vit(VIT_B16), lambda m: multilabel_bce(m(images), targets)),
            ("clip", lambda: build_clip(ClipConfig(name="clip_b16")), lambda m: info_nce(*m(images, tokens, lengths)))):
        torch.manual_seed(0)
        step_s = time_steps(trainer(build(), loss_fn), args.steps, args.warmup)
        results[name] = {"step_s": step_s, "images_per_s": B * world / step_s, "gpus": world,
                         "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
        torch.cuda.reset_peak_memory_stats(device)
    if world > 1:
        dist.destroy_process_group()
    if rank:
        sys.exit(0)
    return {"config": {"model": "ViT-B/16 (CatLIP: 24,320 classes; CLIP: + 12-layer text tower, 77 tokens)",
                       "batch_per_gpu": B, "gpus": world, "precision": "bf16 autocast", "steps": args.steps},
            "results": results["catlip"], "baseline": results["clip"],
            "ratio": results["catlip"]["images_per_s"] / results["clip"]["images_per_s"]}


# ---- CPU: accuracy after equal wall-clock time -----------------------------------------------------------------

def world_data(n_train: int, n_probe: int, n_test: int) -> dict:
    world = shapes.WorldConfig()
    cfg = imagetext.ImageTextDataConfig(image_size=64)

    def pixels(records: list[dict]) -> torch.Tensor:
        batch = imagetext.decode_batch({"key": [r["key"] for r in records], "image": [r["image"] for r in records]},
                                       cfg, False, None)
        return to_pixels(torch.from_numpy(batch["image"]))

    captioned = [shapes.sample(i, 0, world) for i in range(n_train + n_test)]
    labelled = [shapes.labelled_sample(i, 1, world) for i in range(n_probe + n_test)]
    return {"images": pixels(captioned), "captions": [r["caption"] for r in captioned],
            "probe_images": pixels(labelled), "probe_labels": torch.tensor([r["label"] for r in labelled]),
            "n_train": n_train, "n_probe": n_probe}


def train_for(seconds: float, model: torch.nn.Module, loss_of, n_train: int, batch: int) -> int:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.2)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, n_train, (batch,))
        loss = loss_of(model, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return steps


def probe(features, data: dict) -> float:
    with torch.no_grad():
        x = torch.cat([features(chunk) for chunk in data["probe_images"].split(256)])
    n, y = data["n_probe"], data["probe_labels"]
    return linear_probe_accuracy(x[:n], y[:n], x[n:], y[n:], len(shapes.SHAPES))


def cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = world_data(args.train, args.probe, args.test)
    n = data["n_train"]
    found = [synsets.caption_synsets(c) for c in data["captions"]]
    counts = Counter(s for f in found[:n] for s in f)
    vocab = synsets.Vocabulary(*map(list, zip(*synsets.select(counts, None, 5))), "bench")
    targets = torch.zeros(len(found), len(vocab))
    for row, f in zip(targets, found):
        row[[vocab.index[s] for s in f if s in vocab.index]] = 1

    torch.manual_seed(0)
    catlip = build_vit(ViTConfig(**{**VIT_TINY.__dict__, "num_classes": len(vocab)}))
    images = data["images"]
    catlip_steps = train_for(args.seconds, catlip, lambda m, i: multilabel_bce(m(images[i]), targets[i]), n,
                             args.batch)
    catlip.eval()
    with torch.no_grad():
        held_map = mean_average_precision(catlip(images[n:]), targets[n:])
    catlip_acc = probe(catlip.features, data)

    tok = train_bpe(data["captions"][:n], TEXT_TINY.vocab_size)
    ids = [[tok.bos_token_id, *t[:30], tok.eos_token_id] for t in tok(data["captions"], add_special_tokens=False)[
        "input_ids"]]
    tokens = torch.full((len(ids), 32), tok.pad_token_id)
    for row, t in zip(tokens, ids):
        row[:len(t)] = torch.tensor(t)
    lengths = torch.tensor([len(t) for t in ids])
    torch.manual_seed(0)
    clip = build_clip(ClipConfig(name="clip_tiny", image=ViTConfig(**{**VIT_TINY.__dict__, "num_classes": 0}),
                                 text=TEXT_TINY, embed_dim=64))
    clip_steps = train_for(args.seconds, clip, lambda m, i: info_nce(*m(images[i], tokens[i], lengths[i])), n,
                           args.batch)
    clip.eval()
    clip_acc = probe(clip.image.features, data)
    return {"config": {"seconds_each": args.seconds, "batch": args.batch, "threads": args.threads,
                       "model": "vit_tiny (d 96, 4 layers, 64 px)", "train_pairs": n, "probe_train": args.probe,
                       "probe_test": args.test, "vocabulary": len(vocab), "chance": 1 / len(shapes.SHAPES)},
            "results": {"catlip_probe_accuracy": catlip_acc, "steps": catlip_steps, "held_out_map": held_map},
            "baseline": {"clip_probe_accuracy": clip_acc, "steps": clip_steps},
            "ratio": catlip_acc / clip_acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="per GPU (cuda, default 256) or per step (cpu, 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=120.0, help="cpu: training time of each model")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--probe", type=int, default=1000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.batch = args.batch or (256 if args.device == "cuda" else 64)
    out = gpu(args) if args.device == "cuda" else cpu(args)
    print(json.dumps({"benchmark": "catlip_vs_clip", "device": args.device, **out,
                      "command": " ".join([Path(sys.executable).name, *sys.argv])}))


if __name__ == "__main__":
    main()
