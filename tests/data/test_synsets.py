"""CatLIP's caption -> synset rule against the spec's verification table (WordNet 3.0 from Debian), the paper's
noun filter, the vocabulary file (corenet's unpadded keys too) and top-k / threshold selection of counted and of given
vocabularies, and the bad-input cases."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from raytrain.data import synsets
from raytrain.data.synsets import Vocabulary, VocabularyError
from raytrain.train.tasks import Labeler
from tests.conftest import raytrain_at_once

GOLDEN = [  # spec section 5.1: unpadded keys in order
    ("An image of black dog.", ["n5928118", "n4960277", "n2084071"]),
    ("Two bicycles parked near the trees", ["n13743269", "n2834778", "n13104059"]),
    ("A man running on the beach at sunset", ["n10287213", "n9217230", "n15169248"]),
    ("Stock photo: red car on the road", ["n13333833", "n4962784", "n2958343", "n4096066"]),
    ("a dog. a cat on the sofa.", ["n2084071", "n2121620", "n4256520"]),
    ("Puppies and geese in a field", ["n1322604", "n1855672", "n8569998"]),
    ("automobile parked outside a house", ["n8613593", "n3544360"]),
    ("Vintage%20poster+of+a+<b>cat</b>", ["n7892418", "n6793426", "n2121620"]),
    ("2 people walking with 3 dogs", ["n7942152", "n2084071"]),
]


@pytest.mark.parametrize("caption, keys", GOLDEN, ids=[c for c, _ in GOLDEN])
def test_known_captions_give_the_spec_synsets(caption: str, keys: list[str]) -> None:
    assert synsets.caption_synsets(caption) == [f"n{int(k[1:]):08d}" for k in keys]


def test_wordnet_is_3_0_and_cleaning_follows_the_reference() -> None:
    assert synsets.wordnet().get_version() == "3.0"
    assert synsets.clean_caption("Vintage%20poster+of+a+<b>cat</b>\n") == "vintage poster of a cat"
    assert synsets.synset_name("n02084071") == "dog.n.01"
    assert len(synsets.lexnames_text().splitlines()) == 45


def test_reference_mock_vocabulary_target() -> None:
    keys = ["n5928118", "n13333833", "n4960277", "n7947958", "n9638875", "n928077", "n7996689", "n10787470",
            "n5938976", "n8559508"]
    vocab = Vocabulary([f"n{int(k[1:]):08d}" for k in keys], list(range(10, 0, -1)), "mock")
    assert vocab.labels("An image of black dog.") == [0, 2]  # dog is not in the mock vocabulary


def test_noun_only_drops_words_whose_commonest_sense_is_not_a_noun() -> None:
    """The paper keeps nouns; the reference keeps any token whose lemma names a noun synset ("black", "two",
    "red"). noun_only drops the tokens WordNet's sense-tagged counts say are mostly adjectives or numerals."""
    assert synsets.caption_synsets("An image of black dog.", noun_only=True) == ["n05928118", "n02084071"]
    assert synsets.caption_synsets("Two bicycles parked near the trees", noun_only=True) == ["n02834778",
                                                                                              "n13104059"]
    assert synsets.caption_synsets("Stock photo: red car on the road", noun_only=True) == [
        "n13333833", "n02958343", "n04096066"]
    assert synsets.occurrences("a dog and a black dog", noun_only=True) == ["n02084071", "n02084071"]
    vocab = Vocabulary(["n04960277", "n02084071"], [2, 1], "x", noun_only=True)  # black, dog
    assert vocab.labels("a black dog") == [1]
    assert Vocabulary.from_json(vocab.to_json(), "v").noun_only


def test_top_k_and_threshold_with_tie_break() -> None:
    counts = {"n00000003": 5, "n00000001": 5, "n00000002": 9, "n00000004": 1}
    assert synsets.select(counts, None, 1) == [("n00000002", 9), ("n00000001", 5), ("n00000003", 5),
                                               ("n00000004", 1)]
    assert synsets.select(counts, 2, 1) == [("n00000002", 9), ("n00000001", 5)]
    assert synsets.select(counts, None, 5) == [("n00000002", 9), ("n00000001", 5), ("n00000003", 5)]
    assert synsets.select(counts, 1, 6) == [("n00000002", 9)]


def test_vocabulary_count_on_ray_data(ray_cluster) -> None:
    """Per caption through Ray Data (an actor pool, then a groupby); per occurrence and the refusal on the same
    captions from the actor's own keys (one Ray pipeline: each costs ~8 s on 2 cores)."""
    import ray.data

    captions = ["a dog and a dog", "a dog on a sofa", "a cat", "a red cat", "a cat and a bicycle"]
    dog, cat = "n02084071", "n02121620"
    per_caption = synsets.build_vocabulary(ray.data.from_items([{"caption": c} for c in captions]), "src", top_k=2,
                                           min_count=1)
    assert per_caption.ids == [cat, dog] and per_caption.counts == [3, 2]
    occurrences = Counter(synsets._KeyMiner(per_occurrence=True, noun_only=False)({"caption": captions})["key"])
    per_occurrence = synsets.vocabulary_of(occurrences, "src", None, 3, "occurrence", False)
    assert per_occurrence.ids == [dog, cat] and per_occurrence.counts == [3, 3]  # tie: id ascending
    with pytest.raises(VocabularyError, match="min_count"):
        synsets.vocabulary_of(occurrences, "src", None, 10, "occurrence", False)
    with pytest.raises(VocabularyError, match="counting='words'"):
        synsets.build_vocabulary(None, "src", None, counting="words")


def test_vocabulary_file_round_trip_and_bad_files(tmp_path) -> None:
    vocab = Vocabulary(["n02084071", "n02121620"], [7, 3], "abc")
    vocab.save(tmp_path / "v.json")
    again = Vocabulary.load(tmp_path / "v.json")
    assert again.ids == vocab.ids and again.counts == [7, 3] and again.source == "abc"
    assert json.loads((tmp_path / "v.json").read_text())["synsets"][0]["name"] == "dog.n.01"
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(VocabularyError, match="bad.json: format"):
        Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(VocabularyError, match="missing.json"):
        Vocabulary.load(tmp_path / "missing.json")


def test_corenet_unpadded_keys_are_read_and_normalised(tmp_path) -> None:
    """corenet's vocabularies key synsets by unpadded offsets (`n2084071`); they load as ImageNet wnids."""
    entries = [{"id": "n2084071", "count": 9}, {"id": "n02121620", "count": 4}, {"id": "n928077", "count": 2}]
    (tmp_path / "corenet.json").write_text(json.dumps({"format": synsets.VOCAB_FORMAT, "synsets": entries}))
    vocab = Vocabulary.load(tmp_path / "corenet.json")
    assert vocab.ids == ["n02084071", "n02121620", "n00928077"] and vocab.labels("a cat and a dog") == [1, 0]
    for bad, message in ((["n2084071", "n02084071"], "n02084071 is listed twice"), (["dog"], "found 'dog'"),
                         (["n123456789"], "found 'n123456789'")):
        (tmp_path / "bad.json").write_text(json.dumps({"format": synsets.VOCAB_FORMAT,
                                                       "synsets": [{"id": i} for i in bad]}))
        with pytest.raises(VocabularyError, match=message):
            Vocabulary.load(tmp_path / "bad.json")


def test_a_given_vocabulary_is_cut_by_top_k_and_min_count_in_its_own_order() -> None:
    """corenet takes the first V keys of its frequency-ordered file; min_count applies to the recorded counts."""
    vocab = Vocabulary(["n00000005", "n00000001", "n00000003", "n00000002"], [9, 7, 7, 2], "x", "occurrence")
    cut = vocab.truncated(top_k=2, min_count=1)
    assert cut.ids == ["n00000005", "n00000001"] and cut.counts == [9, 7] and cut.counting == "occurrence"
    assert vocab.truncated(top_k=None, min_count=7).ids == ["n00000005", "n00000001", "n00000003"]
    with pytest.raises(VocabularyError, match="min_count=10"):
        vocab.truncated(top_k=None, min_count=10)


def test_vocabulary_from_another_data_set_is_refused_or_reported(caplog) -> None:
    vocab = Vocabulary(["n02084071"], [10], "other-data")  # dog only
    with pytest.raises(VocabularyError, match="labels none of 2 sampled captions"):
        synsets.check_source(vocab, ["a red circle", "a blue square"], "mine", "v.json", "shapes")
    synsets.check_source(vocab, ["a dog", "a blue square"], "mine", "v.json", "shapes")
    assert "labels 50% of sampled captions" in caplog.text
    synsets.check_source(vocab, ["anything"], "other-data", "v.json", "shapes")  # same data set: silent


class _Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.add = self

    def remote(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n


def test_caption_without_known_nouns_gives_an_empty_target_and_is_counted() -> None:
    import numpy as np

    vocab = Vocabulary(["n02084071", "n02121620"], [2, 1], "x")
    counter = _Counter()
    out = Labeler(vocab.to_json(), counter)({"image": np.zeros((3, 2, 2, 3), np.uint8),
                                             "caption": ["of the and", "a cat", "a dog and a cat"]})
    assert out["targets"].tolist() == [[0, 0], [0, 1], [1, 1]]
    assert counter.counts == {"captions_without_labels": 1}


def test_labels_command_prints_one_json_object(tmp_path) -> None:
    Vocabulary(["n02834778", "n02084071"], [2, 1], "x").save(tmp_path / "v.json")
    plain, given = raytrain_at_once(["labels", "a black dog riding a bicycle"],
                                    ["labels", "the dog's 'bicycle'", f"vocab={tmp_path}/v.json"])
    assert plain.returncode == 0 and given.returncode == 0, (plain.stderr, given.stderr)
    assert json.loads(plain.stdout) == {"labels": [
        {"id": "n04960277", "name": "black.n.01"}, {"id": "n02084071", "name": "dog.n.01"},
        {"id": "n00450335", "name": "riding.n.01"}, {"id": "n02834778", "name": "bicycle.n.01"}]}
    assert [(x["name"], x["index"]) for x in json.loads(given.stdout)["labels"]] == [("dog.n.01", 1),
                                                                                    ("bicycle.n.01", 0)]
