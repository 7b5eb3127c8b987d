"""Control policies (spec 2.4): ordered ops that edit tags, and the edit list the prompt phrases.

`remove` deletes selected elements (an object takes its attributes and relations with it; a removed object name
no other object carries becomes forbidden in the caption), `add` inserts elements drawn from a vocabulary (a new
object comes with a colour, a size and a relation to an existing object; a new relation joins existing objects),
`replace` swaps an element for another of its kind (a replaced object keeps its attributes and relations; its old
name becomes forbidden as for remove), `keep` changes nothing. Only object names are ever forbidden: a removed
colour may still describe another object. Ops apply in order with one seeded `random.Random`, so the same seed
gives the same edits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from raytrain.data import shapes
from raytrain.pipelines.ctrlsynth.tags import KINDS, Tags

OPS = ("keep", "remove", "add", "replace")


@dataclass
class OpConfig:
    op: str = "keep"  # keep | remove | add | replace
    kind: str = "object"  # object | attribute | relation
    p: float = 1.0  # per-element probability of being selected (remove, replace)
    max_n: int = 1  # at most this many elements selected (remove, replace) or inserted (add)
    names: list[str] = field(default_factory=list)  # only elements with these names (objects, attributes, predicates)
    vocab: list[str] = field(default_factory=list)  # add/replace draw from it; empty = the world's vocabulary

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op={self.op!r}; expected one of {', '.join(OPS)}")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {', '.join(KINDS)}")
        if not 0 <= self.p <= 1 or self.max_n < 0:
            raise ValueError(f"p={self.p}, max_n={self.max_n}: need 0 <= p <= 1 and max_n >= 0")


@dataclass
class PolicyConfig:
    text_ops: list[OpConfig] = field(default_factory=list)
    keep_original_semantics: bool = False  # SP1/SP3 prompts also quote the original text (SP2 always does)
    style: str = ""  # caption style named in the prompt's constraints
    max_words: int = 40  # caption length constraint (prompt and cleaning); 77 CLIP tokens hold about 40-50 words
    image_style: str = ""  # appended to the text-to-image prompt
    negative_prompt: str = ""


@dataclass
class Edited:
    tags: Tags
    edits: list[dict[str, str]]  # {"op", "kind", "what"[, "to"]}
    forbidden: list[str]


def apply_policy(tags: Tags, ops: list[OpConfig], rng: random.Random) -> Edited:
    """The edited copy of `tags`; `tags` itself is not changed."""
    out = Edited(Tags.from_json(tags.to_json()), [], [])
    for op in ops:
        if op.op != "keep":
            {"remove": _remove, "add": _add, "replace": _replace}[op.op](out, op, rng)
    out.forbidden = sorted(set(out.forbidden) - set(out.tags.objects))
    return out


def _vocab(op: OpConfig, kind_words: tuple[str, ...] | list[str]) -> list[str]:
    return list(op.vocab) or list(kind_words)


def _attribute_words(attr: str) -> tuple[str, ...]:
    return tuple(shapes.SIZES) if attr in shapes.SIZES else tuple(shapes.COLOURS)


def _select(candidates: list[Any], names: list[str], op: OpConfig, rng: random.Random) -> list[Any]:
    chosen = [c for c, name in zip(candidates, names) if (not op.names or name in op.names) and rng.random() < op.p]
    rng.shuffle(chosen)
    return chosen[:op.max_n]


def _remove(out: Edited, op: OpConfig, rng: random.Random) -> None:
    t = out.tags
    if op.kind == "object":
        indices = list(range(len(t.objects)))
        chosen = set(_select(indices, t.objects, op, rng)[:max(0, len(t.objects) - 1)])  # one object stays
        out.edits += [{"op": "remove", "kind": "object", "what": t.phrase(i)} for i in sorted(chosen)]
        out.forbidden += [t.objects[i] for i in chosen]
        keep = [i for i in indices if i not in chosen]
        new = {old: n for n, old in enumerate(keep)}
        out.tags = Tags([t.objects[i] for i in keep], [(new[i], a) for i, a in t.attributes if i in new],
                        [(new[s], p, new[o]) for s, p, o in t.relations if s in new and o in new])
    elif op.kind == "attribute":
        chosen = _select(list(t.attributes), [a for _, a in t.attributes], op, rng)
        out.edits += [{"op": "remove", "kind": "attribute", "what": f"{a} {t.objects[i]}"} for i, a in chosen]
        t.attributes = [a for a in t.attributes if a not in chosen]
    else:
        chosen = _select(list(t.relations), [p for _, p, _ in t.relations], op, rng)
        out.edits += [{"op": "remove", "kind": "relation", "what": f"{t.objects[s]} {p} {t.objects[o]}"}
                      for s, p, o in chosen]
        t.relations = [r for r in t.relations if r not in chosen]


def _add(out: Edited, op: OpConfig, rng: random.Random) -> None:
    t = out.tags
    for _ in range(op.max_n):
        if op.kind == "object":
            i = len(t.objects)
            t.objects.append(rng.choice(_vocab(op, shapes.SHAPES)))
            t.attributes += [(i, rng.choice(list(shapes.SIZES))), (i, rng.choice(list(shapes.COLOURS)))]
            if i:
                t.relations.append((i, rng.choice(shapes.RELATIONS), rng.randrange(i)))
            out.edits.append({"op": "add", "kind": "object", "what": t.phrase(i)})
        elif op.kind == "attribute":
            bare = [(i, kind) for i in range(len(t.objects)) for kind in (shapes.SIZES, shapes.COLOURS)
                    if not any(a in kind for a in t.attrs_of(i))]
            if not bare:
                return
            i, kind = rng.choice(bare)
            t.attributes.append((i, rng.choice([w for w in _vocab(op, tuple(kind)) if w in kind] or list(kind))))
            out.edits.append({"op": "add", "kind": "attribute", "what": f"{t.attributes[-1][1]} {t.objects[i]}"})
        else:
            linked = {frozenset((s, o)) for s, _, o in t.relations}
            free = [(s, o) for s in range(len(t.objects)) for o in range(s + 1, len(t.objects))
                    if frozenset((s, o)) not in linked]
            if not free:
                return
            s, o = rng.choice(free)
            t.relations.append((s, rng.choice(_vocab(op, shapes.RELATIONS)), o))
            out.edits.append({"op": "add", "kind": "relation", "what": f"{t.objects[s]} {t.relations[-1][1]} "
                                                                       f"{t.objects[o]}"})


def _replace(out: Edited, op: OpConfig, rng: random.Random) -> None:
    t = out.tags
    if op.kind == "object":
        for i in _select(list(range(len(t.objects))), t.objects, op, rng):
            old = t.objects[i]
            choices = [w for w in _vocab(op, shapes.SHAPES) if w != old]
            if choices:
                t.objects[i] = rng.choice(choices)
                out.forbidden.append(old)
                out.edits.append({"op": "replace", "kind": "object", "what": old, "to": t.objects[i]})
    elif op.kind == "attribute":
        for i, a in _select(list(t.attributes), [a for _, a in t.attributes], op, rng):
            choices = [w for w in _vocab(op, _attribute_words(a)) if w != a and w in _attribute_words(a)]
            if choices:
                new = rng.choice(choices)
                t.attributes[t.attributes.index((i, a))] = (i, new)
                out.edits.append({"op": "replace", "kind": "attribute", "what": f"{a} {t.objects[i]}",
                                  "to": f"{new} {t.objects[i]}"})
    else:
        for s, p, o in _select(list(t.relations), [p for _, p, _ in t.relations], op, rng):
            choices = [w for w in _vocab(op, shapes.RELATIONS) if w != p]
            if choices:
                new = rng.choice(choices)
                t.relations[t.relations.index((s, p, o))] = (s, new, o)
                out.edits.append({"op": "replace", "kind": "relation", "what": f"{t.objects[s]} {p} {t.objects[o]}",
                                  "to": f"{t.objects[s]} {new} {t.objects[o]}"})
