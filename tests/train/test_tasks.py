"""CatLIP pieces outside Ray: a tiny CatLIP run learns (held-out mAP well above chance) and its classifier rows give
a shape classifier zero-shot accuracy through Transfer Init; Transfer Init's rows and biases; a given vocabulary is
cut by top_k / min_count; RangeAugment; the variable-resolution sampler."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.config import ConfigError
from raytrain.data import imagetext, shapes, synsets
from raytrain.data.variable_batch import batch_shapes, variable_batches
from raytrain.models.range_augment import range_augment_loss, target_mse
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
    tasks.transfer_init(head, source_w, source_b, rows, bias="copy")
    assert torch.equal(head.weight[0], source_w[2]) and torch.equal(head.weight[1], source_w[0])
    assert torch.equal(head.weight[3], source_w[1]) and head.bias[0].item() == 12.0
    assert torch.equal(head.weight[2], before[2]) and torch.equal(head.weight[4], before[4])  # unmapped: random
    assert head.bias[[2, 4]].tolist() == [0.0, 0.0]
    tasks.transfer_init(head, source_w, source_b, rows, bias="mean")
    assert head.bias.tolist() == [12.0, 10.0, 11.0, 11.0, 11.0]  # unmapped: the mean of the copied biases
    tasks.transfer_init(head, source_w, source_b, rows, bias="none")
    assert head.bias.tolist() == [0.0] * 5


def test_unmapped_classes_do_not_start_ahead_of_the_transferred_ones() -> None:
    """A BCE-trained classifier has strongly negative biases for its (rare) synsets; copied as they are, every
    unmapped class (bias 0) outscores every mapped one under softmax, so the transferred rows predict nothing.
    With the mean copied bias for unmapped rows, features of a mapped class pick that class."""
    torch.manual_seed(0)
    source_w = torch.nn.functional.normalize(torch.randn(6, 16), dim=1) * 4
    source_b = torch.full((6,), -6.0)
    features = source_w[:3] / 4  # an image of each of the first three synsets
    head = torch.nn.Linear(16, 5)
    rows = [0, 1, 2, None, None]
    outcome = {}
    for bias in ("copy", "mean"):
        with torch.no_grad():
            head.weight.normal_(0, 0.02)
        tasks.transfer_init(head, source_w, source_b, rows, bias=bias)
        with torch.no_grad():
            outcome[bias] = head(features).argmax(-1).tolist()
    assert outcome["mean"] == [0, 1, 2]
    assert all(c in (3, 4) for c in outcome["copy"])


def test_a_given_vocabulary_is_cut_by_the_task_top_k_and_min_count(tmp_path, monkeypatch) -> None:
    captions = [{"caption": "a circle"}, {"caption": "a dog"}]
    monkeypatch.setattr(imagetext, "captions", lambda data, n=None: type("D", (), {"take_all": lambda s: captions})())
    synsets.Vocabulary([CIRCLE, DOG, SQUARE], [30, 5, 2], "other").save(tmp_path / "v.json")
    task = tasks.CatlipTaskConfig(vocab=str(tmp_path / "v.json"), top_k=2, min_count=1)
    data = imagetext.ImageTextDataConfig()
    assert tasks.catlip_vocabulary(task, data, str(tmp_path)).ids == [CIRCLE, DOG]
    task = tasks.CatlipTaskConfig(vocab=str(tmp_path / "v.json"), top_k=None, min_count=5)
    assert tasks.catlip_vocabulary(task, data, str(tmp_path)).ids == [CIRCLE, DOG]
    task = tasks.CatlipTaskConfig(vocab=str(tmp_path / "v.json"), noun_only=True)
    with pytest.raises(ConfigError, match="task.noun_only=True, but task.vocab"):
        tasks.catlip_vocabulary(task, data, str(tmp_path))


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


def pixels(records: list[dict], size: int) -> torch.Tensor:
    data = imagetext.ImageTextDataConfig(image_size=size)
    batch = imagetext.decode_batch({"key": [r["key"] for r in records], "image": [r["image"] for r in records]},
                                   data, False, None)
    return to_pixels(torch.from_numpy(batch["image"]))


def one_object_colour_set(n: int, world: shapes.WorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out one-object scenes labelled by the object's colour."""
    colours = list(shapes.COLOURS)
    records, labels = [], []
    for i in range(n):
        rng = shapes.sample_rng(7, i)
        scene = shapes.generate_scene(rng, world, shape=rng.choice(world.shapes))
        records.append({"key": str(i), "image": shapes.png_bytes(shapes.render(scene, world.image_size))})
        labels.append(colours.index(scene.objects[0].colour))
    return pixels(records, world.image_size), torch.tensor(labels)


def test_tiny_catlip_run_learns_what_images_show_and_transfer_init_carries_it() -> None:
    """200 steps of CatLIP on captioned scenes: held-out mAP over the colour synsets (what 32-pixel images show
    most plainly; many caption words are template words no image shows) at 1.8x their positive rate or more; and a
    colour classifier whose rows come from the CatLIP classifier by Transfer Init ranks held-out one-object images
    of each colour first (its mAP over the colour classes, zero-shot) at 1.5x chance or more and well above the same
    head with random rows (this seed: colour mAP 0.29 against 0.14; transferred 0.33, random 0.13, chance 0.09).
    Ranking within each class, not argmax accuracy: at this size the rows are not yet calibrated across classes."""
    torch.manual_seed(0)
    world = shapes.WorldConfig(image_size=32)
    records = [shapes.sample(i, 0, world) for i in range(900)]
    labels = [synsets.caption_synsets(r["caption"]) for r in records]
    counts = Counter(s for found in labels[:700] for s in found)
    vocab = synsets.Vocabulary(*map(list, zip(*synsets.select(counts, None, 5))), "train")
    targets = torch.zeros(len(records), len(vocab))
    for row, found in zip(targets, labels):
        row[[vocab.index[s] for s in found if s in vocab.index]] = 1
    images = pixels(records, 32)
    model = build_vit(ViTConfig(name="t", d_model=64, n_layers=2, n_heads=2, ffn_dim=128, num_classes=len(vocab),
                                image_size=32, pos_grid=2))
    colours = [vocab.index[s] for s in map(tasks.class_synset, shapes.COLOURS) if s in vocab.index]
    colour_images, colour_labels = one_object_colour_set(300, world)
    rows = tasks.transfer_rows(list(shapes.COLOURS), vocab.ids)
    assert len(colours) == len(shapes.COLOURS) and None not in rows

    one_hot = torch.nn.functional.one_hot(colour_labels, len(shapes.COLOURS))

    def evaluate() -> tuple[float, float, float]:
        model.eval()
        with torch.no_grad():
            scores = model(images[700:])
            features = model.features(colour_images)
            head = torch.nn.Linear(64, len(shapes.COLOURS))
            random_map = mean_average_precision(head(features), one_hot)
            tasks.transfer_init(head, model.head.weight, model.head.bias, rows, bias="mean")
            transfer_map = mean_average_precision(head(features), one_hot)
        model.train()
        return mean_average_precision(scores[:, colours], targets[700:, colours]), transfer_map, random_map

    untrained, _, _ = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.2)
    for step in range(200):
        idx = torch.randint(0, 700, (64,))
        loss = multilabel_bce(model(images[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    colour_map, transfer_map, random_map = evaluate()
    chance = float(targets[700:, colours].mean())  # the AP of a random ranking is the positive rate
    assert colour_map >= 1.8 * chance and colour_map > untrained + 0.1, (colour_map, chance, untrained)
    assert transfer_map >= 1.5 * float(one_hot.float().mean()) and transfer_map > random_map + 0.05, (
        transfer_map, random_map)


# ---- RangeAugment ----------------------------------------------------------------------------------------------

def test_range_augment_curriculum_and_loss_follow_corenet() -> None:
    """Target MSE: a cosine from PSNR 40 dB (6.5025) to 20 dB (650.25), i/(T+1) as corenet indexes it; the loss is
    smooth-L1 between each image's MSE (0-255 scale) and the target, x 100/65025."""
    assert target_mse(0, 1000) == pytest.approx(6.5025, rel=1e-9)
    assert target_mse(1000, 1000) == pytest.approx(650.25 + 0.5 * (6.5025 - 650.25) * (1 + math.cos(math.pi * 1000
                                                                                                  / 1001)))
    assert target_mse(500, 1000) == pytest.approx(650.25 + 0.5 * (6.5025 - 650.25) * (1 + math.cos(math.pi * 500
                                                                                                 / 1001)))
    images = torch.full((2, 3, 4, 4), 0.5)
    shifted = images + torch.tensor([10.0, 30.0]).view(2, 1, 1, 1) / 255  # MSE 100 and 900
    expected = (abs(100 - 650.25) - 0.5 + abs(900 - 650.25) - 0.5) / 2 * 100 / 65025
    assert range_augment_loss(images, shifted, 650.25).item() == pytest.approx(expected, rel=1e-5)


def test_range_augment_learns_six_range_ends_from_both_losses() -> None:
    """Six scalars (low and high of brightness, contrast, noise), squashed into corenet's bounds; the classifier's
    loss and RangeAugment's own both reach them, and evaluation sees the images unchanged."""
    torch.manual_seed(0)
    cfg = ViTConfig(name="t", d_model=32, n_layers=1, n_heads=2, ffn_dim=64, num_classes=3, image_size=32, pos_grid=2)
    plain, model = build_vit(cfg), build_vit(ViTConfig(**{**cfg.__dict__, "range_augment": True}))
    assert model.param_counts()["params_total"] - plain.param_counts()["params_total"] == 6
    aug = model.augment
    assert aug.brightness.low.item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item() * 0.8 + 0.1)
    images = torch.rand(8, 3, 32, 32)
    logits, seen = model(images, return_augmented=True)
    changed = (seen - images).abs().flatten(1).amax(1) > 1e-6
    assert 4 <= int(changed.sum()) <= 8 and seen.min() >= 0 and seen.max() <= 1  # each op on a random half
    for loss in (multilabel_bce(logits, torch.ones(8, 3)), range_augment_loss(images, seen, 650.25)):
        grads = torch.autograd.grad(loss, list(aug.parameters()), retain_graph=True, allow_unused=True)
        assert sum(g is not None and g.abs().item() > 0 for g in grads) >= 4
    model.eval()
    _, unchanged = model(images, return_augmented=True)
    assert torch.equal(unchanged, images)


# ---- the variable-resolution sampler (spec 5.4) ----------------------------------------------------------------

@pytest.mark.parametrize("base_batch, batches", [
    (1024, [3136, 2477, 2007, 1658, 1393, 1187, 1024, 892, 784, 694, 619, 555, 501]),
    (512, [1568, 1238, 1003, 829, 696, 593, 512, 446, 392, 347, 309, 277, 250]),
    (256, [784, 619, 501, 414, 348, 296, 256, 223, 196, 173, 154, 138, 125]),
])
def test_batch_shapes_are_the_spec_table(base_batch: int, batches: list[int]) -> None:
    shapes_ = batch_shapes(224, base_batch, 128, 320, 25, 16)
    assert [s for s, _ in shapes_] == list(range(128, 321, 16)) and [b for _, b in shapes_] == batches


def test_variable_batches_recut_the_stream_into_drawn_sides_and_sizes() -> None:
    """Every rank draws the same (side, size) sequence from the epoch's seed, every image of a batch is resized to
    its side, and the samples keep their order (no sample lost or repeated, the last incomplete batch dropped)."""
    shapes_ = batch_shapes(64, 8, 32, 96, 25, 16)
    assert [s for s, _ in shapes_] == [32, 48, 64, 80, 96] and [b for _, b in shapes_] == [32, 14, 8, 5, 3]
    stream = [{"image": torch.randint(0, 256, (8, 96, 96, 3), dtype=torch.uint8), "targets": torch.arange(i * 8,
                                                                                                        i * 8 + 8)}
              for i in range(40)]
    first, again = (list(variable_batches(iter(stream), shapes_, seed=3)) for _ in range(2))
    assert [(b["image"].shape[1], len(b["image"])) for b in first] == [(b["image"].shape[1], len(b["image"]))
                                                                       for b in again]
    assert all((b["image"].shape[1], len(b["targets"])) in shapes_ for b in first)
    assert len({b["image"].shape[1] for b in first}) > 2
    order = torch.cat([b["targets"] for b in first])
    assert torch.equal(order, torch.arange(order.numel())) and 320 - order.numel() < 32
    other = list(variable_batches(iter(stream), shapes_, seed=4))
    assert [len(b["targets"]) for b in other] != [len(b["targets"]) for b in first]
