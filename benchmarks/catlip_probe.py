"""CatLIP's recipe pieces on the procedural world (CPU, small): do RangeAugment, the variable-resolution sampler and
the Transfer Init bias rule help? One run, every variant trained from the same seed on the same data for the same
number of steps.

Pretraining variants: plain CatLIP (fixed side, BCE), + RangeAugment (learnt ranges, BCE + its loss), + the
variable-resolution sampler (a random side per batch, batch size scaled to keep the pixels), + both. Each is scored
on held-out captioned scenes (mAP over all synsets and over the colour synsets, the attribute 32-pixel images show
plainly) and by a linear probe on frozen features classifying the shapes of held-out one-object images.

Transfer Init (on the plain model): a colour classifier over held-out one-object images whose rows come from the
CatLIP classifier, with 4 of the 11 colours left unmapped (as most ImageNet classes are: 395 of 1000 reachable), and
each bias rule: `copy` (BCE biases copied, unmapped 0), `mean` (unmapped get the mean copied bias), `none` (weights
only), against random rows; accuracy zero-shot and after `--head-steps` steps of head-only training.

    python benchmarks/catlip_probe.py --steps 200

Prints one JSON line; the baseline is plain CatLIP, `ratio` the probe accuracy of the full recipe (both) over it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.data import imagetext, shapes, synsets  # noqa: E402
from raytrain.data.variable_batch import batch_shapes, resized  # noqa: E402
from raytrain.models.range_augment import range_augment_loss, target_mse  # noqa: E402
from raytrain.models.vit import ViTConfig, build_vit, to_pixels  # noqa: E402
from raytrain.train import tasks  # noqa: E402
from raytrain.train.metrics import linear_probe_accuracy, mean_average_precision  # noqa: E402
from raytrain.train.objectives import multilabel_bce  # noqa: E402

SIDE = 32
UNMAPPED = ("purple", "pink", "brown", "cyan")  # colours whose synsets the Transfer Init pretends not to know


def uint8_images(records: list[dict], side: int) -> torch.Tensor:
    data = imagetext.ImageTextDataConfig(image_size=side)
    batch = imagetext.decode_batch({"key": [r["key"] for r in records], "image": [r["image"] for r in records]},
                                   data, False, None)
    return torch.from_numpy(batch["image"])


def one_object_sets(n: int, world: shapes.WorldConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-object scenes: images, shape labels, colour labels."""
    records, shape_labels, colour_labels = [], [], []
    for i in range(n):
        rng = shapes.sample_rng(11, i)
        scene = shapes.generate_scene(rng, world, shape=rng.choice(world.shapes))
        records.append({"key": str(i), "image": shapes.png_bytes(shapes.render(scene, world.image_size))})
        shape_labels.append(world.shapes.index(scene.objects[0].shape))
        colour_labels.append(list(shapes.COLOURS).index(scene.objects[0].colour))
    return to_pixels(uint8_images(records, SIDE)), torch.tensor(shape_labels), torch.tensor(colour_labels)


def pretrain(images: torch.Tensor, targets: torch.Tensor, augment: bool, variable: bool, args) -> torch.nn.Module:
    """images uint8 (N, S, S, 3) at the largest side when `variable`, else at SIDE."""
    torch.manual_seed(0)
    model = build_vit(ViTConfig(name="t", d_model=64, n_layers=2, n_heads=2, ffn_dim=128,
                                num_classes=targets.shape[1], image_size=SIDE, pos_grid=2, range_augment=augment))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.2)
    grid = batch_shapes(SIDE, args.batch, SIDE // 2, SIDE * 3 // 2, 25, 16) if variable else [(SIDE, args.batch)]
    draws = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        side, size = grid[int(torch.randint(len(grid), (1,), generator=draws))]
        idx = torch.randint(0, args.train, (size,), generator=draws)
        x = to_pixels(resized(images[idx], side))
        logits, seen = model(x, return_augmented=True)
        loss = multilabel_bce(logits, targets[idx])
        if augment:
            loss = loss + range_augment_loss(x, seen, target_mse(step, args.steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def score(model: torch.nn.Module, held_out: torch.Tensor, held_targets: torch.Tensor, colours: list[int],
          probe: tuple[torch.Tensor, ...], args) -> dict:
    images, shape_labels, _ = probe
    with torch.no_grad():
        logits, feats = model(held_out), model.features(images)
    n = args.probe_train
    return {"map": mean_average_precision(logits, held_targets),
            "colour_map": mean_average_precision(logits[:, colours], held_targets[:, colours]),
            "shape_probe_accuracy": linear_probe_accuracy(feats[:n], shape_labels[:n], feats[n:], shape_labels[n:],
                                                          len(shapes.SHAPES))}


def transfer(model: torch.nn.Module, vocab: synsets.Vocabulary, probe: tuple[torch.Tensor, ...], args) -> dict:
    """Zero-shot and briefly trained accuracy of a colour head per init rule."""
    images, _, colour_labels = probe
    with torch.no_grad():
        feats = model.features(images)
    rows = [None if c in UNMAPPED else r for c, r in zip(shapes.COLOURS, tasks.transfer_rows(list(shapes.COLOURS),
                                                                                              vocab.ids))]
    n, out = args.probe_train, {}
    for rule in ("random", "copy", "mean", "none"):
        torch.manual_seed(0)
        head = torch.nn.Linear(feats.shape[1], len(shapes.COLOURS))
        if rule != "random":
            tasks.transfer_init(head, model.head.weight.detach(), model.head.bias.detach(), rows, bias=rule)
        accuracy = {}
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
        for step in range(args.head_steps + 1):
            if step in (0, args.head_steps):
                with torch.no_grad():
                    accuracy[f"after_{step}_steps"] = float((head(feats[n:]).argmax(-1) == colour_labels[n:]).float()
                                                            .mean())
            loss = F.cross_entropy(head(feats[:n]), colour_labels[:n], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[rule] = accuracy
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--probe-train", type=int, default=300)
    p.add_argument("--probe-test", type=int, default=300)
    p.add_argument("--head-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    world = shapes.WorldConfig(image_size=SIDE * 3 // 2)
    records = [shapes.sample(i, 0, world) for i in range(args.train + args.test)]
    found = [synsets.caption_synsets(r["caption"]) for r in records]
    counts = Counter(s for f in found[:args.train] for s in f)
    vocab = synsets.Vocabulary(*map(list, zip(*synsets.select(counts, None, 5))), "bench")
    targets = torch.zeros(len(records), len(vocab))
    for row, f in zip(targets, found):
        row[[vocab.index[s] for s in f if s in vocab.index]] = 1
    large = uint8_images(records, SIDE * 3 // 2)  # the variable sampler's largest side
    small = resized(large, SIDE)
    held_out, held_targets = to_pixels(small[args.train:]), targets[args.train:]
    colours = [vocab.index[s] for s in map(tasks.class_synset, shapes.COLOURS) if s in vocab.index]
    probe = one_object_sets(args.probe_train + args.probe_test, world)
    results, models = {}, {}
    for name, augment, variable in (("plain", False, False), ("range_augment", True, False),
                                    ("variable_resolution", False, True), ("both", True, True)):
        models[name] = pretrain(large if variable else small, targets, augment, variable, args)
        results[name] = score(models[name], held_out, held_targets, colours, probe, args)
        print(json.dumps({"variant": name, **results[name]}), file=sys.stderr, flush=True)
    results["transfer_init"] = transfer(models["plain"], vocab, probe, args)
    print(json.dumps({
        "benchmark": "catlip_probe", "device": "cpu",
        "config": {"steps": args.steps, "batch": args.batch, "side": SIDE, "variable_sides": [16, 32, 48],
                   "model": "ViT d 64, 2 layers, 32 px", "train_pairs": args.train, "held_out": args.test,
                   "vocabulary": len(vocab), "probe_train": args.probe_train, "probe_test": args.probe_test,
                   "unmapped_colours": list(UNMAPPED), "head_steps": args.head_steps, "threads": args.threads,
                   "seconds": round(time.time() - started)},
        "results": {k: v for k, v in results.items() if k != "plain"}, "baseline": results["plain"],
        "ratio": results["both"]["shape_probe_accuracy"] / results["plain"]["shape_probe_accuracy"],
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
