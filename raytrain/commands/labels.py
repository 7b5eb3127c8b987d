"""`raytrain labels "a black dog riding a bicycle"`: the WordNet synsets CatLIP mines from a caption, as one JSON
object `{"labels": [{"id": "n02084071", "name": "dog.n.01"}, ...]}`. With `vocab=FILE` only the synsets of that
vocabulary are kept, each with its classifier `index`; `noun_only=true` applies the paper's noun filter."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from raytrain.config import ConfigError
from raytrain.data import synsets

CONFIG_NAME = "labels"
HELP = "print the WordNet synset labels CatLIP derives from a caption, as JSON"
POSITIONAL = "text"  # `raytrain labels TEXT` passes TEXT as text=...


def run(cfg: DictConfig) -> None:
    if cfg.text is None:
        raise ConfigError('give the caption: raytrain labels "a black dog riding a bicycle"')
    found = synsets.caption_synsets(str(cfg.text), noun_only=cfg.noun_only)
    labels = [{"id": s, "name": synsets.synset_name(s)} for s in found]
    if cfg.vocab:
        vocab = synsets.Vocabulary.load(cfg.vocab)
        labels = [{**label, "index": vocab.index[label["id"]]} for label in labels if label["id"] in vocab.index]
    print(json.dumps({"labels": labels}))
