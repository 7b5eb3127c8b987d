"""CatLIP pieces outside Ray: a tiny CatLIP run learns (held-out mAP well above chance), Transfer Init copies the
right classifier rows, and a backbone checkpoint starts a classifier."""

from __future__ import annotations

from collections import Counter

import torch

from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.data import imagetext, shapes, synsets
from raytrain.models.vit import ViTConfig, build_vit, to_pixels
from raytrain.train import tasks
from raytrain.train.metrics import mean_average_precision
from raytrain.train.objectives import multilabel_bce

CIRCLE, DOG, SQUARE = "n13873502", "n02084071", "n13878634"


def test_transfer_init_picks_the_rows_of_the_class_synsets() -> None:
    rows = tasks.transfer_rows(["square", "circle", "not-a-word", DOG, "ice cream"], [CIRCLE, DOG, SQUARE])
    assert rows == [2, 0, None, 1, None]
    head = torch.nn.Linear(4, 5)
    before = head.weight.detach().clone()
    source_w, source_b = torch.arange(12.0).view(3, 4), torch.tensor([10.0, 11.0, 12.0])
    tasks.transfer_init(head, source_w, source_b, rows)
    assert torch.equal(head.weight[0], source_w[2]) and torch.equal(head.weight[1], source_w[0])
    assert torch.equal(head.weight[3], source_w[1]) and head.bias[0].item() == 12.0
    assert torch.equal(head.weight[2], before[2]) and torch.equal(head.weight[4], before[4])  # unmapped: random


def test_backbone_checkpoint_starts_a_classifier_with_transfer_init(tmp_path) -> None:
    torch.manual_seed(0)
    source_cfg = ViTConfig(name="src", d_model=32, n_layers=1, n_heads=2, ffn_dim=64, num_classes=3, image_size=32,
                           pos_grid=2)
    source = build_vit(source_cfg)
    vocab = synsets.Vocabulary([CIRCLE, DOG, SQUARE], [3, 2, 1], "x")
    save_pretrained(tmp_path / "ckpt", source_cfg, {k: v.detach() for k, v in model_state(source).items()},
                    {tasks.VOCAB_FILE: vocab.to_json()})
    target = build_vit(ViTConfig(**{**source_cfg.__dict__, "num_classes": 2}))
    rows = tasks.init_from_backbone(target, str(tmp_path / "ckpt"), ["square", "triangle"], True)
    assert rows == [2, None]
    assert torch.equal(target.head.weight[0], source.head.weight[2])
    assert torch.equal(target.layers[0].mlp[0].weight, source.layers[0].mlp[0].weight)


def test_tiny_catlip_run_learns_held_out_map_above_chance() -> None:
    torch.manual_seed(0)
    world = shapes.WorldConfig(image_size=32)
    records = [shapes.sample(i, 0, world) for i in range(900)]
    labels = [synsets.caption_synsets(r["caption"]) for r in records]
    counts = Counter(s for found in labels[:700] for s in found)
    vocab = synsets.Vocabulary(*map(list, zip(*synsets.select(counts, None, 5))), "train")
    targets = torch.zeros(len(records), len(vocab))
    for row, found in zip(targets, labels):
        row[[vocab.index[s] for s in found if s in vocab.index]] = 1
    data = imagetext.ImageTextDataConfig(image_size=32)
    batch = imagetext.decode_batch({"key": [r["key"] for r in records], "image": [r["image"] for r in records]},
                                   data, False, None)
    images = to_pixels(torch.from_numpy(batch["image"]))
    model = build_vit(ViTConfig(name="t", d_model=64, n_layers=2, n_heads=2, ffn_dim=128, num_classes=len(vocab),
                                image_size=32, pos_grid=2))
    with torch.no_grad():
        untrained = mean_average_precision(model(images[700:]), targets[700:])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.2)
    for step in range(200):
        idx = torch.randint(0, 700, (64,))
        loss = multilabel_bce(model(images[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        held_out = mean_average_precision(model(images[700:]), targets[700:])
    present = targets[700:].sum(0) > 0
    chance = targets[700:, present].mean().item()  # the AP of a random ranking is the positive rate
    # many labels are template words no image shows ("picture", "stock"); shapes and colours are learnt
    assert held_out > 1.4 * chance and held_out > untrained + 0.05, (held_out, chance, untrained)
