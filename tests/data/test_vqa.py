"""VQA from scene records: every answer checked against the scene by an independent reading of the question,
referents that single out one object, held-out records from unseen scenes, and training rows whose labels cover
exactly the answer and EOS (plain and chat templates), with bad rows skipped and counted."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from raytrain.data import shapes, vqa

WORLD = shapes.WorldConfig(image_size=32)
ATTRS = ("size", "colour", "shape")


def matches(scene: shapes.Scene, words: str) -> list[int]:
    """Objects a description ("large red star", "blue object") fits."""
    words = words.removesuffix(" object").split()
    return [i for i, o in enumerate(scene.objects) if all(w in {getattr(o, a) for a in ATTRS} for w in words)]


def check(scene: shapes.Scene, kind: str, question: str, answer: str) -> None:
    objs = scene.objects
    if kind == "count":
        assert answer == str(len(objs))
    elif kind == "count_shape":
        shape = re.fullmatch(r"How many (\w+) are there\?", question)[1]
        assert answer == str(sum(vqa.plural(o.shape) == shape for o in objs))
    elif kind == "exists":
        colour, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", question).groups()
        assert answer == ("yes" if any((o.colour, o.shape) == (colour, shape) for o in objs) else "no")
    elif kind == "relation":
        a, said, b = re.fullmatch(r"Is the (.+?) (to the left of|to the right of|above|below) the (.+)\?",
                                  question).groups()
        (i,), (j,) = matches(scene, a), matches(scene, b)
        predicate = {"to the left of": "left of", "to the right of": "right of"}.get(said, said)
        truth = any((r.subject, r.predicate, r.object) == (i, predicate, j) for r in scene.relations)
        assert answer == ("yes" if truth else "no")
    else:
        pattern = {"colour": r"What colour is the (.+)\?", "shape": r"What shape is the (.+)\?",
                   "size": r"Is the (.+) small or large\?"}[kind]
        ref = re.fullmatch(pattern, question)[1]
        (i,) = matches(scene, ref)  # the referent singles out one object ...
        assert kind not in ref.split() and getattr(objs[i], kind) not in ref.split()  # ... without the answer
        assert answer == getattr(objs[i], kind)


def test_answers_are_true_of_their_scenes_and_every_kind_occurs() -> None:
    kinds = set()
    for index in range(600):
        rng = random.Random(f"vqa:0:{index}")
        scene = shapes.generate_scene(rng, WORLD)
        kind, question, answer = vqa.ask(scene, rng, WORLD)
        check(scene, kind, question, answer)
        kinds.add(kind)
    assert kinds == set(vqa.KINDS)


def test_records_are_deterministic_and_splits_use_other_scenes() -> None:
    first = vqa.record(7, 0, WORLD)
    assert first == vqa.record(7, 0, WORLD)
    assert first["scene"] != vqa.record(10_000_007, 0, WORLD)["scene"]
    scene = shapes.Scene.from_dict(__import__("json").loads(first["scene"]))
    check(scene, first["kind"], first["question"], first["answer"])


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                              pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return tok


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_training_rows_supervise_the_answer_and_eos_only(tokenizer, chat_tokenizer, template: str) -> None:
    from raytrain.data.tokenizer import to_files

    tok = chat_tokenizer if template == "chat" else tokenizer
    cfg = vqa.VQADataConfig(image_size=32, max_text_tokens=40, template="auto")
    records = [vqa.record(i, 0, WORLD) for i in range(3)]
    batch = {k: np.array([r[k] for r in records], dtype=object) for k in ("key", "image", "question", "answer",
                                                                          "scene")}
    batch["question"][1] = "What colour is " + "the very " * 30 + "star?"  # too long for 40 tokens
    batch["image"][2] = b"not an image"
    skipped: list[tuple[str, int]] = []

    class Counter:
        class add:  # noqa: N801 - stands in for an actor method
            @staticmethod
            def remote(kind: str, n: int) -> None:
                skipped.append((kind, n))

    rows = vqa.Tokenize(to_files(tok), cfg, Counter())(batch)
    assert sorted(skipped) == [("undecodable_images", 1), ("vqa_rows_over_max_text_tokens", 1)]
    assert rows["image"].shape == (1, 32, 32, 3) and rows["tokens"].shape == (1, 40)
    before, after = vqa.prompt_ids(tok, records[0]["question"], template)
    target = vqa.answer_ids(tok, records[0]["answer"], template)
    length = len(before) + len(after) + len(target)
    assert rows["image_at"][0] == len(before) and rows["length"][0] == length
    assert rows["tokens"][0, :length].tolist() == [*before, *after, *target]
    assert rows["labels"][0].tolist() == [vqa.IGNORE] * (length - len(target)) + target + [vqa.IGNORE] * (40 - length)
    assert target[-1] == tok.eos_token_id
    assert tok.decode(target[:-1]).strip() == records[0]["answer"]
    if template == "chat":
        assert tok.decode(before).startswith("<s>user\n") and "Answer with one word." in tok.decode(after)


def test_caption_rows_are_llava_alignment_samples(tokenizer) -> None:
    """target=caption: BOS, the image, a caption of the record's scene (the same on every read) with EOS, all of
    it supervised; the question is not used."""
    from raytrain.data.tokenizer import to_files

    cfg = vqa.VQADataConfig(image_size=32, max_text_tokens=64, target="caption")
    r = vqa.record(3, 0, WORLD)
    batch = {k: np.array([r[k]], dtype=object) for k in ("key", "image", "question", "answer", "scene")}
    rows = vqa.Tokenize(to_files(tokenizer), cfg)(batch)
    text = vqa.caption(r["key"], r["scene"])
    assert text == vqa.caption(r["key"], r["scene"]) and text != r["question"]
    target = tokenizer.encode(f" {text}", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert rows["image_at"][0] == 1 and rows["tokens"][0, 0] == tokenizer.bos_token_id
    assert rows["labels"][0, 1:1 + len(target)].tolist() == target and rows["labels"][0, 0] == vqa.IGNORE
