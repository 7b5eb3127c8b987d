"""Captions to WordNet noun synset labels, as CatLIP mines them (spec `catlip.md` sections 2.1, 2.2 and 2.5).

A caption is cleaned (URL-unquote, `+` to space, HTML tags removed, spaces collapsed, ftfy, lower case), split into
sentences with a regex and tokenized by NLTK; each token is lemmatized as a noun and kept when `lemma.n.01` exists
and is named after that lemma. Its key is the synset's offset, `n` + 8 digits (ImageNet's wnid form; corenet's
unpadded keys such as `n2084071` are read and normalised). The vocabulary is the most frequent keys of a data set,
counted with Ray Data and saved as a JSON file; a caption's label set is the vocabulary indices of its keys (empty
when none is known: the sample still trains on a zero target).

The reference ignores the part of speech ("black" is a label). `noun_only` is the paper's stricter reading: a token
counts only when WordNet's sense-tagged frequencies (SemCor, `cntlist.rev`) make its noun senses at least as common
as those of any other part of speech. No POS tagger is packaged offline, so this is a context-free approximation.

WordNet 3.0 is Debian's `wordnet-base` read through NLTK; `install_wordnet` lays Debian's files out the way NLTK's
reader wants them (plus the `lexnames` file Debian lacks), with nothing downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrain.config import RaytrainError

log = logging.getLogger(__name__)

DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_FILES = [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")] + [
    f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")] + ["index.sense", "cntlist.rev"]
# lexnames(5WN): file number, name, syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb)
LEXNAMES = (["adj.all", "adj.pert", "adv.all"]
            + [f"noun.{n}" for n in ("Tops", "act", "animal", "artifact", "attribute", "body", "cognition",
                                     "communication", "event", "feeling", "food", "group", "location", "motive",
                                     "object", "person", "phenomenon", "plant", "possession", "process", "quantity",
                                     "relation", "shape", "state", "substance", "time")]
            + [f"verb.{v}" for v in ("body", "change", "cognition", "communication", "competition", "consumption",
                                     "contact", "creation", "emotion", "motion", "perception", "possession",
                                     "social", "stative", "weather")]
            + ["adj.ppl"])
_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
_HTML_TAG = re.compile(r"<.*?>")
_SPACES = re.compile(r" +")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
VOCAB_FORMAT = "raytrain-synset-vocab-1"


class WordNetError(RaytrainError):
    pass


class VocabularyError(RaytrainError):
    pass


# ---- WordNet ---------------------------------------------------------------------------------------------------

def lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def default_nltk_root() -> Path:
    """`<venv>/nltk_data` when writable (on NLTK's default search path, no variable needed), else ~/nltk_data."""
    prefix = Path(sys.prefix) / "nltk_data"
    return prefix if os.access(prefix.parent, os.W_OK) else Path.home() / "nltk_data"


def install_wordnet(source: Path = DEBIAN_WORDNET, root: Path | None = None) -> Path:
    """Copy Debian's WordNet 3.0 files (copies: newer NLTK refuses symlinks) and `lexnames` into
    `root/corpora/wordnet`, atomically; an installation from before a file joined the list gets that file added."""
    target = (root or default_nltk_root()) / "corpora" / "wordnet"
    missing = [f for f in WORDNET_FILES if not (source / f).is_file()]
    if (target / "lexnames").is_file():
        for name in WORDNET_FILES:
            if not (target / name).is_file() and name not in missing:
                tmp = target / f".{name}.tmp"
                shutil.copyfile(source / name, tmp)
                os.replace(tmp, target / name)
        return target
    if missing:
        raise WordNetError(f"WordNet 3.0 is not installed: {source} lacks {', '.join(missing[:3])}; run "
                           "`apt-get install wordnet-base wordnet-sense-index` (or `make setup`)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    for name in WORDNET_FILES:
        shutil.copyfile(source / name, tmp / name)
    (tmp / "lexnames").write_text(lexnames_text())
    try:
        os.replace(tmp, target)
    except OSError:  # another process installed it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.cache
def wordnet() -> Any:
    """NLTK's WordNet 3.0 reader (installed from Debian's files on first use when needed)."""
    import nltk
    from nltk.corpus import wordnet as wn

    try:
        wn.ensure_loaded()
        if not Path(str(wn.root), "cntlist.rev").is_file():  # installed before the sense counts joined the list
            install_wordnet(root=Path(str(wn.root)).parent.parent)
    except LookupError:
        root = install_wordnet().parent.parent
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
        wn.ensure_loaded()
    if wn.get_version() != "3.0":
        raise WordNetError(f"NLTK found WordNet {wn.get_version()}; CatLIP labels need WordNet 3.0")
    return wn


@functools.cache
def _lemmatizer() -> Any:
    from nltk.stem import WordNetLemmatizer

    wordnet()
    return WordNetLemmatizer()


def synset_id(offset: int, pos: str = "n") -> str:
    """ImageNet-style id: `n02084071`."""
    return f"{pos}{offset:08d}"


def normalised_id(key: str) -> str:
    """`n2084071` (corenet's unpadded key) or `n02084071` -> `n02084071`; ValueError for anything else."""
    if not re.fullmatch(r"n\d{1,8}", key):
        raise ValueError(f"synset ids must look like n02084071 (or corenet's n2084071); found {key!r}")
    return synset_id(int(key[1:]))


def synset_name(sid: str) -> str:
    """`n02084071` -> `dog.n.01`."""
    return wordnet().synset_from_pos_and_offset(sid[0], int(sid[1:])).name()


# ---- caption -> keys -------------------------------------------------------------------------------------------

def clean_caption(text: str) -> str:
    """corenet's `caption_preprocessing`, in its order."""
    import ftfy

    text = urllib.parse.unquote(str(text)).replace("+", " ")
    text = _HTML_TAG.sub("", text)
    text = text.strip("\n")
    text = _SPACES.sub(" ", text)
    return ftfy.fix_text(text).strip().lower()


def tokenize(text: str) -> list[str]:
    """NLTK's word tokenizer on regex-split sentences (punkt is not packaged offline; without the split a
    mid-caption "dog." stays one token)."""
    import nltk

    return [w for sentence in _SENTENCE_END.split(text) for w in nltk.word_tokenize(sentence, preserve_line=True)]


def caption_synsets(caption: str, noun_only: bool = False) -> list[str]:
    """The synset ids a caption yields, in order of appearance, each once (no vocabulary filter)."""
    return list(dict.fromkeys(occurrences(caption, noun_only)))


def occurrences(caption: str, noun_only: bool = False) -> list[str]:
    """The synset id of every token that yields one, in order (once per occurrence: the `occurrence` counting
    unit)."""
    wn, lemmatize = wordnet(), _lemmatizer().lemmatize
    out = []
    for word in tokenize(clean_caption(caption)):
        lemma = lemmatize(word)
        name = f"{lemma}.n.01"
        try:
            synset = wn.synset(name)
        except Exception:  # unknown lemma, or a malformed name (the reference skips on any exception)
            continue
        if synset.name() == name and (not noun_only or _mostly_noun(word)):
            out.append(synset_id(synset.offset(), synset.pos()))
    return out


@functools.cache
def _mostly_noun(word: str) -> bool:
    """Whether the noun senses of `word` are tagged at least as often in SemCor as those of any other part of
    speech (words never tagged count as nouns)."""
    counts: dict[str, int] = {}
    for lemma in wordnet().lemmas(word):
        pos = "a" if lemma.synset().pos() == "s" else lemma.synset().pos()
        counts[pos] = counts.get(pos, 0) + lemma.count()
    return counts.get("n", 0) >= max(counts.values(), default=0)


# ---- vocabulary ------------------------------------------------------------------------------------------------

@dataclass
class Vocabulary:
    """Synset ids by label index (most frequent first), with their counts and the data set they were counted on."""

    ids: list[str]
    counts: list[int]
    source: str  # fingerprint of the data set counted
    counting: str = "caption"  # caption (document frequency) | occurrence
    noun_only: bool = False  # captions are mined with the noun filter (labels must be mined the same way)

    def __post_init__(self) -> None:
        self.index = {sid: i for i, sid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self, caption: str) -> list[int]:
        """Label indices of a caption (empty when none of its synsets is in the vocabulary)."""
        return [self.index[s] for s in caption_synsets(caption, self.noun_only) if s in self.index]

    def truncated(self, top_k: int | None, min_count: int) -> Vocabulary:
        """The first `top_k` entries (the file's order: most frequent first, as corenet takes the first V keys) of
        those counted at least `min_count` times."""
        kept = [(s, c) for s, c in zip(self.ids, self.counts) if c >= min_count][:top_k]
        if not kept:
            raise VocabularyError(f"no synset of the vocabulary has a count of at least min_count={min_count}")
        return Vocabulary([s for s, _ in kept], [c for _, c in kept], self.source, self.counting, self.noun_only)

    def to_json(self) -> str:
        entries = [{"id": s, "name": synset_name(s), "count": c} for s, c in zip(self.ids, self.counts)]
        return json.dumps({"format": VOCAB_FORMAT, "source": self.source, "counting": self.counting,
                           "noun_only": self.noun_only, "synsets": entries}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Vocabulary:
        try:
            raw = json.loads(text)
            if raw.get("format") != VOCAB_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {VOCAB_FORMAT!r}")
            entries = raw["synsets"]
            ids = [normalised_id(e["id"]) for e in entries]
            if not ids:
                raise ValueError("it lists no synsets")
            if len(set(ids)) < len(ids):
                raise ValueError(f"synset {next(i for i in ids if ids.count(i) > 1)} is listed twice")
            return cls(ids, [int(e.get("count", 0)) for e in entries], raw.get("source", ""),
                       raw.get("counting", "caption"), bool(raw.get("noun_only", False)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VocabularyError(f"vocabulary file {where}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Atomic: a temporary sibling renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise VocabularyError(f"vocabulary file {path}: {e.strerror}") from None
        return cls.from_json(text, str(path))


def select(counts: dict[str, int], top_k: int | None, min_count: int) -> list[tuple[str, int]]:
    """Sort by (count desc, id asc), keep keys with count >= `min_count`, then at most `top_k` of them."""
    ranked = sorted(((k, c) for k, c in counts.items() if c >= min_count), key=lambda kc: (-kc[1], kc[0]))
    return ranked[:top_k] if top_k else ranked


def fingerprint(captions: Iterable[str]) -> str:
    """Identifies a data set by a sample of its captions (recorded in the vocabulary, checked by training)."""
    h = hashlib.sha256()
    for c in captions:
        h.update(str(c).encode() + b"\0")
    return h.hexdigest()[:16]


class _KeyMiner:
    """Ray Data actor: caption batch -> one row per (caption, synset id); loads WordNet once per actor."""

    def __init__(self, per_occurrence: bool, noun_only: bool) -> None:
        wordnet()
        self.per_occurrence, self.noun_only = per_occurrence, noun_only

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys: list[str] = []
        for caption in batch["caption"]:
            keys += (occurrences if self.per_occurrence else caption_synsets)(caption, self.noun_only)
        return {"key": keys}


def build_vocabulary(captions: Any, source: str, top_k: int | None, min_count: int = 1,
                     counting: str = "caption", actors: int = 1, noun_only: bool = False) -> Vocabulary:
    """Count synset ids over a Ray Dataset with a `caption` column and keep the top-k / count >= min_count."""
    return vocabulary_of(count_synsets(captions, counting, actors, noun_only), source, top_k, min_count, counting,
                         noun_only)


def count_synsets(captions: Any, counting: str, actors: int = 1, noun_only: bool = False) -> dict[str, int]:
    """Synset id -> captions naming it (`counting="caption"`) or its occurrences, over a Ray Dataset."""
    import ray.data

    if counting not in ("caption", "occurrence"):
        raise VocabularyError(f"counting={counting!r}; expected caption or occurrence")
    keys = captions.select_columns(["caption"]).map_batches(
        _KeyMiner, fn_constructor_kwargs={"per_occurrence": counting == "occurrence", "noun_only": noun_only},
        batch_size=256, compute=ray.data.ActorPoolStrategy(size=actors))
    return {row["key"]: int(row["count()"]) for row in keys.groupby("key").count().take_all()}


def vocabulary_of(counts: dict[str, int], source: str, top_k: int | None, min_count: int, counting: str,
                  noun_only: bool) -> Vocabulary:
    """The vocabulary `select` keeps of synset counts; refused when it keeps nothing."""
    kept = select(counts, top_k, min_count)
    if not kept:
        raise VocabularyError(f"no synset occurs at least {min_count} times in the captions; lower the "
                              "vocabulary's min_count or check the caption column")
    return Vocabulary([k for k, _ in kept], [c for _, c in kept], source, counting, noun_only)


def label_report(captions: Sequence[str], vocab: Vocabulary) -> dict[str, float]:
    """How well a vocabulary covers some captions: the share with at least one label, the mean label count."""
    labels = [vocab.labels(c) for c in captions]
    n = max(len(labels), 1)
    return {"covered": sum(bool(x) for x in labels) / n, "mean_labels": sum(map(len, labels)) / n}


def check_source(vocab: Vocabulary, sample: Sequence[str], source: str, vocab_path: str, data_name: str) -> None:
    """A vocabulary counted on other data than `sample` (by fingerprint) is reported with its coverage, and refused
    when it labels none of the sampled captions (training would see only zero targets)."""
    if vocab.source == source:
        return
    covered = label_report(sample, vocab)["covered"]
    if covered == 0:
        raise VocabularyError(f"vocabulary {vocab_path} labels none of {len(sample)} sampled captions of "
                              f"{data_name}: it was built on another data set")
    log.warning("vocabulary %s was built on another data set than %s; it labels %.0f%% of sampled captions",
                vocab_path, data_name, 100 * covered)
