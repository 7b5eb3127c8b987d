"""Tags (objects, attributes, relations), the one normalizer, the caption parser and the coverage the filters use.

The vocabulary is the procedural world's (`raytrain/data/shapes.py`): objects are shape nouns, attributes colours
and sizes, relations the four spatial predicates. Tags are per instance: `attributes` and `relations` point at
objects by index, so "two red circles" is two objects. Every word the tagger, the policies, the parser and the
filters compare goes through `lemma`, whose version is pinned in every output's provenance (spec trap 3).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from raytrain.config import RaytrainError
from raytrain.data import shapes

NORMALIZER_VERSION = "norm-1"
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
              "huge": "large"}
SYNONYMS = {"grey": "gray", "rhombus": "diamond", "moon": "crescent", "plus": "cross", "hexagonal": "hexagon",
            "circular": "circle", "round": "circle", "triangular": "triangle", "violet": "purple",
            "turquoise": "cyan"}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "a": 1, "an": 1, "single": 1, "pair": 2}
NEGATIONS = {"no", "not", "without", "none", "nor", "never"}
# multi-word relation phrases first; each maps to a predicate of shapes.RELATIONS, or its inverse
RELATION_PHRASES = [("to the left of", "left of"), ("on the left of", "left of"), ("left of", "left of"),
                    ("to the right of", "right of"), ("on the right of", "right of"), ("right of", "right of"),
                    ("above", "above"), ("over", "above"), ("on top of", "above"), ("below", "below"),
                    ("under", "below"), ("underneath", "below"), ("beneath", "below")]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
KINDS = ("object", "attribute", "relation")


@dataclass
class Tags:
    objects: list[str] = field(default_factory=list)  # noun lemmas, one per instance
    attributes: list[tuple[int, str]] = field(default_factory=list)  # (object index, attribute)
    relations: list[tuple[int, str, int]] = field(default_factory=list)  # (subject, predicate, object)

    def to_json(self) -> dict[str, Any]:
        return {"objects": list(self.objects), "attributes": [list(a) for a in self.attributes],
                "relations": [list(r) for r in self.relations]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Tags:
        return cls(list(d["objects"]), [(int(i), str(a)) for i, a in d["attributes"]],
                   [(int(s), str(p), int(o)) for s, p, o in d["relations"]])

    def attrs_of(self, i: int) -> list[str]:
        return [a for j, a in self.attributes if j == i]

    def phrase(self, i: int) -> str:
        """'small red circle': size, colour, noun."""
        attrs = sorted(self.attrs_of(i), key=lambda a: a not in shapes.SIZES)
        return " ".join([*attrs, self.objects[i]])

    def readable(self) -> dict[str, list[str]]:
        """The tags as phrases, for prompts and provenance."""
        return {"objects": list(self.objects), "attributes": [f"{a} {self.objects[i]}" for i, a in self.attributes],
                "relations": [f"{self.objects[s]} {p} {self.objects[o]}" for s, p, o in self.relations]}

    def keys(self, kind: str) -> set[tuple[str, ...]]:
        """Instance-free keys of one kind, what coverage compares: ('circle',), ('circle', 'red'),
        ('circle', 'left of', 'square') with relations written one way (left of, above)."""
        if kind == "object":
            return {(o,) for o in self.objects}
        if kind == "attribute":
            return {(self.objects[i], a) for i, a in self.attributes}
        return {canonical_relation(self.objects[s], p, self.objects[o]) for s, p, o in self.relations}


def canonical_relation(subject: str, predicate: str, obj: str) -> tuple[str, str, str]:
    if predicate in ("right of", "below"):
        return obj, INVERSE[predicate], subject
    return subject, predicate, obj


@cache
def _wordnet_lemma(word: str) -> str:
    """WordNet's singular of a noun outside the vocabulary; the word itself where the WordNet data is not
    installed (e.g. a GPU box running only the caption benchmark): such words never match a tag anyway."""
    from raytrain.data.synsets import wordnet

    try:
        return wordnet().morphy(word, "n") or word
    except (LookupError, OSError, RaytrainError):
        return word


def lemma(word: str) -> str:
    """The normal form of one word: lower case, synonyms to the vocabulary's word, plural nouns to singular."""
    word = word.lower().strip("-'\"")
    word = SYNONYMS.get(word, word)
    if word in shapes.SHAPES or word in shapes.COLOURS or word in SIZE_WORDS or word in NUMBERS:
        return SIZE_WORDS.get(word, word)
    for suffix in ("es", "s"):  # the vocabulary's plurals without WordNet
        if word.endswith(suffix) and word[:-len(suffix)] in shapes.SHAPES:
            return word[:-len(suffix)]
    if word.endswith("s") and word.isalpha():
        singular = _wordnet_lemma(word)
        return SYNONYMS.get(singular, singular)
    return word


def words(text: str) -> list[str]:
    """Normalized words of a text (hyphens split words, punctuation dropped)."""
    return [lemma(w) for w in re.findall(r"[a-zA-Z]+", text.replace("-", " "))]


def _match_relation(tokens: list[str], i: int) -> tuple[str, int] | None:
    for phrase, predicate in RELATION_PHRASES:
        p = phrase.split()
        if tokens[i:i + len(p)] == p:
            return predicate, len(p)
    return None


def parse_caption(text: str) -> Tags:
    """The objects a caption asserts, with their colours and sizes and the relations between consecutive noun
    phrases ("a small red circle to the left of two blue squares"). A negated noun phrase ("no star", "without
    a star") is not an object; `mentions` still sees its words."""
    tokens = words(text)
    tags = Tags()
    pending: list[str] = []
    count, negated = 1, False
    relation: str | None = None
    last_group: list[int] = []
    i = 0
    while i < len(tokens):
        rel = _match_relation(tokens, i)
        if rel is not None:
            relation, i = rel[0], i + rel[1]
            continue
        t = tokens[i]
        if t in NEGATIONS:
            negated = True
        elif t in NUMBERS:
            count = NUMBERS[t]
        elif t in shapes.COLOURS or t in shapes.SIZES:
            pending.append(t)
        elif t in shapes.SHAPES:
            if not negated:
                group = list(range(len(tags.objects), len(tags.objects) + count))
                for j in group:
                    tags.objects.append(t)
                    tags.attributes += [(j, a) for a in dict.fromkeys(pending)]
                if relation is not None and last_group:
                    tags.relations.append((last_group[0], relation, group[0]))
                last_group = group
            pending, count, negated, relation = [], 1, False, None
        elif t in ("and", "with", "of") or t.endswith("ground"):
            pending, count = [], 1
            if t == "and":
                negated = False
        i += 1
    return tags


def mentions(text: str) -> set[str]:
    return set(words(text))


def coverage(found: Tags, required: Tags, kinds: list[str]) -> float:
    """Share of the required tag keys (of the given kinds) present in `found`; 1.0 when nothing is required."""
    need = set().union(*(required.keys(k) for k in kinds))
    if not need:
        return 1.0
    have = set().union(*(found.keys(k) for k in kinds))
    return len(need & have) / len(need)


def object_precision(found: Tags, required: Tags) -> float:
    """Share of the found object instances that the required tags account for (counts matter: a caption that
    turns one cross into two has precision 1/2); 1.0 when nothing is found. Catches hallucinated extras, which
    coverage cannot (spec trap 5)."""
    if not found.objects:
        return 1.0
    return sum((Counter(found.objects) & Counter(required.objects)).values()) / len(found.objects)


def forbidden_mentions(text: str, forbidden: list[str]) -> list[str]:
    """Forbidden names the text mentions, negated or not ("no circle" mentions circle: spec trap 2)."""
    said = mentions(text)
    return [f for f in forbidden if f in said]
