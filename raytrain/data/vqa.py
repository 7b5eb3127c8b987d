"""Visual question answering over the procedural image world (`shapes.py`), and its training pipeline on Ray Data.

Each record is a scene, its rendered image and one question with a short answer read off the scene record: `count`
("How many objects are there?" -> "2"), `count_shape` ("How many stars are there?" -> "0"), `colour` ("What colour
is the heart?" -> "red"), `shape` ("What shape is the blue object?" -> "star"), `size` ("Is the cross small or
large?" -> "large"), `exists` ("Is there a green circle?" -> yes/no, half of each) and `relation` ("Is the red star
to the left of the blue circle?" -> yes/no, half of each). Objects are named by the fewest attributes that single
them out in their scene, never by the attribute asked about. A record is a pure function of (seed, index), so a
held-out split is another range of scene indices: images the model never saw.

`raytrain data make=vqa out=DIR` writes `DIR/train/` and `DIR/heldout/` as parquet (`key`, `image` PNG bytes,
`question`, `answer`, `kind`, `scene` JSON), each split written under a temporary name and renamed into place.

Training rows (`training_dataset`): the image decoded and resized in Ray Data, and the text tokenized around it:
`before` (the prompt up to the image), `after` (the rest of the prompt) and the answer with EOS, which alone carries
labels. The prompt is the tokenizer's chat template when it has one (SmolLM2-Instruct: system prompt, then the user
turn `<image>\\n{question} Answer with one word.`), else `plain` (BOS, image, `\\nQuestion: {question}\\nAnswer:`).
With `target: caption` a row is instead LLaVA's alignment (Stage 1) sample in its `plain` template: BOS, the image,
then a caption of the scene (`shapes.describe`, drawn from the record's key) with EOS, all of it supervised.
Rows longer than `max_text_tokens` and images that do not decode are skipped and counted.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raytrain.config import ConfigError
from raytrain.data import shapes
from raytrain.data.imagetext import count_skip

KINDS = ("count", "count_shape", "colour", "shape", "size", "exists", "relation")
IMAGE = "<image>"
IGNORE = -100
_SAID = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "heldout")


@dataclass
class VQADataConfig:
    path: str | None = None  # a `make=vqa` directory (its train/ split) or parquet files; None = generated now
    samples: int = 20000  # generated records (path: null)
    seed: int = 0
    world: shapes.WorldConfig = field(default_factory=lambda: shapes.WorldConfig(image_size=128))
    image_size: int = 128  # side of the images fed to the tower
    max_text_tokens: int = 96  # prompt + answer tokens per row (longer rows are skipped and counted)
    template: str = "auto"  # auto (chat if the tokenizer has a chat template) | chat | plain
    target: str = "answer"  # answer (VQA) | caption (Stage-1 alignment: BOS, image, caption)
    shuffle_buffer: int = 1024
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError(f"template={self.template!r}; expected auto, chat or plain")
        if self.target not in ("answer", "caption"):
            raise ValueError(f"target={self.target!r}; expected answer or caption")


# ---- questions from scene records --------------------------------------------------------------------------------

def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "h")) else "s")


def name(scene: shapes.Scene, i: int, without: str = "") -> str | None:
    """The shortest description of object i that no other object of the scene matches ("star", "red star",
    "large red star"), not using attribute `without`; None if there is none."""
    objs = scene.objects
    o = objs[i]
    choices = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"), ("colour",),
               ("size", "colour")]
    for attrs in choices:
        if without in attrs:
            continue
        if not any(all(getattr(p, a) == getattr(o, a) for a in attrs) for j, p in enumerate(objs) if j != i):
            words = [getattr(o, a) for a in attrs]
            return " ".join(words) + ("" if "shape" in attrs else " object")
    return None


def ask(scene: shapes.Scene, rng: random.Random, world: shapes.WorldConfig) -> tuple[str, str, str]:
    """(kind, question, answer) of one question about `scene`, its kind drawn uniformly from those it allows."""
    objs = scene.objects
    for kind in rng.sample(KINDS, len(KINDS)):
        if kind == "count":
            return kind, "How many objects are there?", str(len(objs))
        if kind == "count_shape":
            shape = rng.choice([o.shape for o in objs] if objs and rng.random() < 0.6 else world.shapes)
            return kind, f"How many {plural(shape)} are there?", str(sum(o.shape == shape for o in objs))
        if kind == "exists":
            colour, shape = rng.choice(list(shapes.COLOURS)), rng.choice(world.shapes)
            if objs and rng.random() < 0.5:
                colour, shape = rng.choice([(o.colour, o.shape) for o in objs])
            present = any((o.colour, o.shape) == (colour, shape) for o in objs)
            return kind, f"Is there a {colour} {shape}?", "yes" if present else "no"
        if not objs:
            continue
        i = rng.randrange(len(objs))
        attribute = {"colour": "colour", "shape": "shape", "size": "size"}.get(kind)
        if attribute is not None and (ref := name(scene, i, without=attribute)) is not None:
            question = {"colour": f"What colour is the {ref}?", "shape": f"What shape is the {ref}?",
                        "size": f"Is the {ref} small or large?"}[kind]
            return kind, question, getattr(objs[i], attribute)
        if kind == "relation" and len(objs) > 1:
            rel = rng.choice(scene.relations)
            a, b = name(scene, rel.subject), name(scene, rel.object)
            if a is None or b is None:
                continue
            truth = rng.random() < 0.5
            predicate = rel.predicate if truth else _OPPOSITE[rel.predicate]
            return kind, f"Is the {a} {_SAID[predicate]} the {b}?", "yes" if truth else "no"
    return "count", "How many objects are there?", str(len(objs))


def record(index: int, seed: int, world: shapes.WorldConfig) -> dict[str, Any]:
    """Record `index` of the VQA set: a scene, its PNG and one question with its answer."""
    rng = random.Random(f"vqa:{seed}:{index}")
    scene = shapes.generate_scene(rng, world)
    kind, question, answer = ask(scene, rng, world)
    return {"key": f"{index:09d}", "image": shapes.png_bytes(shapes.render(scene, world.image_size)),
            "question": question, "answer": answer, "kind": kind, "scene": json.dumps(scene.to_dict())}


def _records(batch: dict[str, Any], seed: int, world: shapes.WorldConfig) -> dict[str, Any]:
    rows = [record(int(i), seed, world) for i in batch["id"]]
    return {k: [r[k] for r in rows] for k in rows[0]}


def generated(start: int, count: int, seed: int, world: shapes.WorldConfig) -> Any:
    """Records `start .. start+count-1` as a Ray Dataset, generated in parallel."""
    import ray.data

    ids = ray.data.range(count, override_num_blocks=max(1, min(64, count // 256)))
    return ids.map_batches(lambda b: {"id": b["id"] + start}).map_batches(
        _records, fn_kwargs={"seed": seed, "world": world})


def write_splits(out: Path, train: int, heldout: int, heldout_start: int, seed: int,
                 world: shapes.WorldConfig) -> dict[str, int]:
    """`out/train` (scenes 0..train-1) and `out/heldout` (scenes heldout_start..), parquet written by Ray Data."""
    if heldout_start < train:
        raise ConfigError(f"vqa.heldout_start={heldout_start} overlaps the {train} training scenes")
    counts = {}
    for split, start, count in (("train", 0, train), ("heldout", heldout_start, heldout)):
        final = out / split
        if final.exists():
            raise ConfigError(f"out={out} already holds a {split}/ split; choose an empty directory")
        tmp = out / f".{split}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        generated(start, count, seed, world).write_parquet(str(tmp))
        os.replace(tmp, final)
        counts[split] = count
    return counts


def read_records(cfg: VQADataConfig, split: str = "train") -> Any:
    """The records of `split`: generated (path null; the held-out split starts at scene 10,000,000) or read."""
    import ray.data

    if cfg.path is None:
        return generated(0 if split == "train" else 10_000_000, cfg.samples, cfg.seed, cfg.world)
    path = Path(cfg.path)
    files = path / split if (path / split).is_dir() else path
    if not files.exists():
        raise ConfigError(f"data.path={cfg.path}: no {split}/ split there (write one with raytrain data make=vqa)")
    return ray.data.read_parquet(str(files), columns=["key", "image", "question", "answer", "kind", "scene"])


# ---- prompts --------------------------------------------------------------------------------------------------

def template_of(tok: Any, template: str) -> str:
    if template == "auto":
        return "chat" if getattr(tok, "chat_template", None) else "plain"
    if template == "chat" and not getattr(tok, "chat_template", None):
        raise ConfigError("data.template=chat: the tokenizer has no chat template")
    return template


def prompt_ids(tok: Any, question: str, template: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the image for `question` (`template` chat or plain)."""
    if template == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": f"{IMAGE}\n{question} Answer with one word."}],
                                       add_generation_prompt=True, tokenize=False)
        before, after = text.split(IMAGE)
        return tok.encode(before, add_special_tokens=False), tok.encode(after, add_special_tokens=False)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return bos, tok.encode(f"\nQuestion: {question}\nAnswer:", add_special_tokens=False)


def answer_ids(tok: Any, answer: str, template: str) -> list[int]:
    """The answer's token ids, EOS last (chat answers follow the assistant header; plain ones a space)."""
    return tok.encode(answer if template == "chat" else f" {answer}", add_special_tokens=False) + [tok.eos_token_id]


def caption(key: str, scene: str) -> str:
    """An alt-text caption of a record's scene (JSON), the same for a key on every read."""
    return shapes.describe(shapes.Scene.from_dict(json.loads(scene)), random.Random(f"caption:{key}"))


def normalise(text: str) -> str:
    """An answer as exact match compares it: lower case, no surrounding space or final full stop."""
    return text.strip().rstrip(".").strip().lower()


# ---- the training pipeline ----------------------------------------------------------------------------------------

def tokenizer_texts(cfg: VQADataConfig, limit: int) -> Any:
    """Questions and answers of the training split (what a BPE for a from-scratch decoder is trained on)."""
    rows = read_records(cfg).limit(limit).select_columns(["question", "answer"]).iter_rows()
    return (f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)


class Tokenize:
    """Ray Data actor: rows -> `image` (S, S, 3) uint8, `tokens` and `labels` (max_text_tokens,), `image_at`,
    `length`; undecodable images and rows too long are skipped and counted."""

    def __init__(self, files: dict[str, str], cfg: VQADataConfig, counter: Any = None) -> None:
        from raytrain.data.tokenizer import from_files

        self.tok, self.cfg, self.counter = from_files(files), cfg, counter
        self.template = template_of(self.tok, cfg.template)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        L = self.cfg.max_text_tokens
        out: dict[str, list] = {"image": [], "tokens": [], "labels": [], "image_at": [], "length": []}
        too_long = 0
        for key, data, question, answer, scene in zip(batch["key"], batch["image"], batch["question"],
                                                      batch["answer"], batch["scene"]):
            if self.cfg.target == "caption":
                before, after = prompt_ids(self.tok, "", "plain")[0], []
                target = answer_ids(self.tok, caption(str(key), str(scene)), "plain")
            else:
                before, after = prompt_ids(self.tok, str(question), self.template)
                target = answer_ids(self.tok, str(answer), self.template)
            ids = [*before, *after, *target]
            if len(ids) > L:
                too_long += 1
                continue
            try:
                image = decode_image(data, self.cfg.image_size)
            except Exception as e:  # PIL raises many types for bad data; the record is skipped whatever it is
                count_skip(self.counter, "undecodable_images", 1, f"record {key}: {type(e).__name__}: {e}")
                continue
            tokens = np.full(L, self.pad, dtype=np.int64)
            labels = np.full(L, IGNORE, dtype=np.int64)
            tokens[:len(ids)] = ids
            labels[len(ids) - len(target):len(ids)] = target
            for k, v in (("image", image), ("tokens", tokens), ("labels", labels), ("image_at", len(before)),
                         ("length", len(ids))):
                out[k].append(v)
        if too_long:
            count_skip(self.counter, "vqa_rows_over_max_text_tokens", too_long,
                       f"longer than data.max_text_tokens={L}")
        return {k: np.stack(v) if v else np.zeros((0,) + _EMPTY[k](self.cfg), _DTYPES[k]) for k, v in out.items()}


_DTYPES = {"image": np.uint8, "tokens": np.int64, "labels": np.int64, "image_at": np.int64, "length": np.int64}
_EMPTY = {"image": lambda c: (c.image_size, c.image_size, 3), "tokens": lambda c: (c.max_text_tokens,),
          "labels": lambda c: (c.max_text_tokens,), "image_at": lambda c: (), "length": lambda c: ()}


def decode_image(data: bytes, size: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (size, size, 3), the centred square resized (no augmentation: answers such as
    left/right and counts must stay true)."""
    from PIL import Image

    from raytrain.data.imagetext import center_box

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        box = center_box(*image.size)
        return np.array(image.resize((size, size), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)


def training_dataset(cfg: VQADataConfig, files: dict[str, str], counter: Any = None) -> Any:
    import ray.data

    return read_records(cfg).map_batches(Tokenize, fn_constructor_kwargs={"files": files, "cfg": cfg,
                                                                         "counter": counter},
                                         batch_size=64, batch_format="numpy",
                                         compute=ray.data.ActorPoolStrategy(size=1))
