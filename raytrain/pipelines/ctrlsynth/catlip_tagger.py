"""The project's CatLIP classifier as CtrlSynth's multi-label tagger, united with a region tagger
(`synth.tagger.kind=catlip`).

The spec's tag stage is hybrid: CatLIP's multi-label classes plus objects, attributes and relations that
Florence-2 + an LLM extract from a detailed caption, merged by union after normalisation. Here the region tagger
(templates or neural, `synth.tagger.region`) stands in for the caption path, and a CatLIP run (`raytrain train
job=catlip`: a ViT classifier over WordNet synsets with its `synsets.json`) gives the classes: sigmoid per class, the
`top_k` highest kept when they score at least `threshold`, each synset mapped to its normalised noun (`tags.words`).
A class adds an object only when its noun is one of the world's object nouns and the region tagger found no object
of that name: CatLIP also learns the alt-text's other nouns ("picture", "background", the colours, which the caption
rule makes synsets too), and none of those is an object the parser, policies or filters could match. Added objects
carry no attributes or relations (a class says nothing about an instance).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from raytrain.config import RaytrainError
from raytrain.data import shapes, synsets
from raytrain.pipelines.ctrlsynth.tagger import (CatlipTaggerConfig, Tagger, TaggerConfig, build_region_tagger,
                                                 read_image)
from raytrain.pipelines.ctrlsynth.tags import Tags, words

VERSION = "catlip-1"
VOCAB_FILE = "synsets.json"  # what a CatLIP run saves beside its weights (`raytrain.train.tasks.VOCAB_FILE`)


def synset_noun(name: str) -> str:
    """`hexagon.n.01` -> `hexagon`, through the one normalizer (multi-word names `ice_cream.n.01` keep both words)."""
    return " ".join(words(name.split(".")[0].replace("_", " ")))


def synset_names(vocab_file: Path) -> list[str]:
    """The synset names of a run's vocabulary, by class index; raises, naming the file, when it is malformed."""
    text = vocab_file.read_text()
    ids = synsets.Vocabulary.from_json(text, str(vocab_file)).ids
    # the trainer writes each synset's name beside its id: WordNet is only needed for a file without them
    return [e.get("name") or synsets.synset_name(i) for e, i in zip(json.loads(text)["synsets"], ids)]


def kept(scores: np.ndarray, top_k: int, threshold: float) -> list[int]:
    """Indices of the `top_k` highest scores (ties: the lower index) that are at least `threshold`, best first."""
    best = np.argsort(-scores, kind="stable")[:top_k]
    return [int(i) for i in best if scores[i] >= threshold]


def union(tags: Tags, nouns: list[str]) -> Tags:
    """`tags` plus one object per noun that is not already an object of them (spec: merge by union); the region
    tagger's objects, attributes and relations stay as they are."""
    have = set(tags.objects)
    new = [n for n in dict.fromkeys(nouns) if n not in have]
    return Tags([*tags.objects, *new], list(tags.attributes), list(tags.relations))


class CatlipClassifier:
    """A CatLIP ViT and its synset vocabulary: an image's kept classes as normalised nouns."""

    def __init__(self, model: torch.nn.Module, names: list[str], cfg: CatlipTaggerConfig, digest: str) -> None:
        self.model = model.eval()
        self.nouns = [synset_noun(n) for n in names]
        self.cfg = cfg
        self.version = f"{VERSION}:{digest[:12]}"

    @classmethod
    def load(cls, cfg: CatlipTaggerConfig) -> CatlipClassifier:
        """The ViT classifier and `synsets.json` of a CatLIP run or checkpoint; the version hashes both and the
        kept-class settings."""
        from raytrain.checkpoint.hf import CheckpointError, load_pretrained, weight_files
        from raytrain.models.vit import ViTConfig

        key = f"synth.tagger.catlip.checkpoint={cfg.checkpoint}"
        try:
            loaded = load_pretrained(cfg.checkpoint)
        except CheckpointError as e:
            raise RaytrainError(f"{key}: {e}") from None
        vocab_file = loaded.path / VOCAB_FILE
        if not isinstance(loaded.config, ViTConfig) or not loaded.config.num_classes or not vocab_file.is_file():
            raise RaytrainError(f"{key}: not a CatLIP run (a ViT classifier with {VOCAB_FILE} beside it; train one "
                                "with `raytrain train job=catlip`)")
        names = synset_names(vocab_file)
        if len(names) != loaded.config.num_classes:
            raise RaytrainError(f"{key}: {VOCAB_FILE} lists {len(names)} synsets for "
                                f"{loaded.config.num_classes} classifier rows")
        digest = hashlib.sha256(vocab_file.read_bytes() + f"|{cfg.top_k}|{cfg.threshold}".encode())
        for f in weight_files(loaded.path):
            digest.update(f.read_bytes())
        return cls(loaded.model, names, cfg, digest.hexdigest())

    @torch.inference_mode()
    def scores(self, image: np.ndarray) -> np.ndarray:
        """Sigmoid score per class of an RGB uint8 image (H, W, 3)."""
        from raytrain.models.vit import to_pixels

        logits = self.model(to_pixels(torch.tensor(image)[None]))  # a copy: decoded images are read-only
        return torch.sigmoid(logits[0].float()).numpy()

    def classes(self, image: np.ndarray) -> list[tuple[str, float]]:
        """(noun, score) of the `top_k` best classes scoring at least `threshold`, best first."""
        scores = self.scores(image)
        return [(self.nouns[i], float(scores[i])) for i in kept(scores, self.cfg.top_k, self.cfg.threshold)]

    def objects(self, image: np.ndarray) -> list[str]:
        """The kept classes that name an object of the world (see the module docstring)."""
        return [noun for noun, _ in self.classes(image) if noun in shapes.SHAPES]


class CatlipTagger:
    """The region tagger's tags united with CatLIP's object classes."""

    def __init__(self, region: Tagger, catlip: CatlipClassifier, image_size: int = 64) -> None:
        self.region, self.catlip, self.image_size = region, catlip, image_size
        self.version = f"{region.version}+{catlip.version}"

    @classmethod
    def load(cls, cfg: TaggerConfig) -> CatlipTagger:
        return cls(build_region_tagger(cfg), CatlipClassifier.load(cfg.catlip), cfg.image_size)

    def tag(self, data: bytes) -> Tags:
        """Tags of an encoded image; raises on bytes that do not decode."""
        return self.tag_image(read_image(data, self.image_size))

    def tag_image(self, image: np.ndarray) -> Tags:
        """Tags of an RGB uint8 image (H, W, 3) of the configured size."""
        return union(self.region.tag_image(image), self.catlip.objects(image))

