"""The per-record steps of spec 2.3, plain Python: each step reads and updates a record's `state` (JSON-able), so
Ray Data stages (`runner.py`) can run them over batches in any process and tests can run them alone.

`state` = {"tags": source tags or None, "error": why the record was dropped or None, "candidates": one per path}.
A candidate carries its path, seeds, edited or reference tags, edits, forbidden names, prompt (and hash), caption,
scores, and its `status`: pending, accepted, or rejected with a `reason`. Reasons: corrupt_image, no_tags (the
record); no_reference_tags, llm_error, empty_caption, forbidden_mention, text_filter, precision_filter, t2i_error,
image_filter
(a candidate).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from raytrain.data.shapes import png_bytes
from raytrain.pipelines.ctrlsynth.config import IMAGE_PATHS, TEXT_PATHS, SynthConfig
from raytrain.pipelines.ctrlsynth.llm import CaptionJob, CaptionWriter
from raytrain.pipelines.ctrlsynth.policy import apply_policy
from raytrain.pipelines.ctrlsynth.prompt import caption_prompt, clean_caption, image_prompt, prompt_hash
from raytrain.pipelines.ctrlsynth.t2i import T2I
from raytrain.pipelines.ctrlsynth.tagger import Tagger
from raytrain.pipelines.ctrlsynth.tags import Tags, coverage, forbidden_mentions, object_precision, parse_caption


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from (global seed, record id, policy, path, role), the same in every process."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def new_state() -> dict[str, Any]:
    return {"tags": None, "error": None, "candidates": []}


def decompose(state: dict[str, Any], image: bytes, tagger: Tagger) -> None:
    """Step 1: tags of the source image; a record whose image does not decode or shows nothing is dropped."""
    try:
        tags = tagger.tag(image)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad bytes
        state["error"] = f"corrupt_image: {type(e).__name__}: {e}"
        return
    if not tags.objects:
        state["error"] = "no_tags: the tagger found no object"
        return
    state["tags"] = tags.to_json()


def control(state: dict[str, Any], key: str, text: str, cfg: SynthConfig) -> None:
    """Steps 2 and 5's inputs: one candidate per path. Text paths edit the source tags with the policy and build
    the caption prompt; SP4 takes its reference tags from the original text (spec trap 10)."""
    if state["error"]:
        return
    policy = cfg.active_policy
    source = Tags.from_json(state["tags"])
    for path in cfg.paths:
        rng = random.Random(derive_seed(cfg.seed, key, cfg.policy, path, "policy"))
        cand: dict[str, Any] = {"path": path, "status": "pending", "reason": "",
                                "seeds": {k: derive_seed(cfg.seed, key, cfg.policy, path, k)
                                          for k in ("policy", "llm", "t2i")}}
        if path in TEXT_PATHS:
            edited = apply_policy(source, policy.text_ops, rng)
            original = text if path == "SP2" or policy.keep_original_semantics else None
            prompt = caption_prompt(edited.tags, edited.edits, original, policy.max_words, policy.style)
            cand.update(required=edited.tags.to_json(), edits=edited.edits, forbidden=edited.forbidden,
                        prompt=prompt, prompt_hash=prompt_hash(prompt))
        else:
            reference = parse_caption(text)
            cand.update(required=reference.to_json(), edits=[], forbidden=[], caption=text)
            if not reference.objects:
                cand.update(status="rejected", reason="no_reference_tags")
        state["candidates"].append(cand)


def recompose_text(states: list[dict[str, Any]], writer: CaptionWriter, cfg: SynthConfig) -> None:
    """Step 3 over a batch of records: every pending text candidate's caption, cleaned; failures are counted."""
    todo = [c for s in states for c in s["candidates"] if c["path"] in TEXT_PATHS and c["status"] == "pending"]
    jobs = [CaptionJob(c["prompt"], Tags.from_json(c["required"]), c["seeds"]["llm"]) for c in todo]
    replies = writer.write(jobs) if jobs else []
    for cand, reply in zip(todo, replies):
        cand["model"] = writer.name
        if isinstance(reply, Exception):
            cand.update(status="rejected", reason=f"llm_error: {type(reply).__name__}: {reply}")
            continue
        cand["raw"] = reply
        cand["caption"] = clean_caption(reply, cfg.active_policy.max_words)
        if not cand["caption"]:
            cand.update(status="rejected", reason="empty_caption")


def filter_text(state: dict[str, Any], cfg: SynthConfig) -> None:
    """Step 4: a caption that names a forbidden object, covers less than tau_text of the required tags, or (when
    tau_precision > 0) names too many objects the tags do not have, is rejected; SP1/SP2 captions that pass are
    accepted (their image is the real one)."""
    for cand in state["candidates"]:
        if cand["path"] not in TEXT_PATHS or cand["status"] != "pending":
            continue
        said = forbidden_mentions(cand["caption"], cand["forbidden"])
        found, required = parse_caption(cand["caption"]), Tags.from_json(cand["required"])
        score, precision = coverage(found, required, cfg.text_cover), object_precision(found, required)
        cand["scores"] = {"text_coverage": round(score, 4), "object_precision": round(precision, 4)}
        if said:
            cand.update(status="rejected", reason=f"forbidden_mention: {', '.join(said)}")
        elif score < cfg.tau_text:
            cand.update(status="rejected", reason="text_filter")
        elif precision < cfg.tau_precision:
            cand.update(status="rejected", reason="precision_filter")
        elif cand["path"] != "SP3":
            cand["status"] = "accepted"


def recompose_image(state: dict[str, Any], t2i: T2I, tagger: Tagger, cfg: SynthConfig) -> dict[str, bytes]:
    """Steps 5-7: SP3 draws its new caption, SP4 the original text; the tagger checks the new image against the
    required tags (at least tau_image of them). Returns the PNG of every accepted image candidate by path."""
    images = {}
    policy = cfg.active_policy
    for cand in state["candidates"]:
        if cand["path"] not in IMAGE_PATHS or cand["status"] != "pending":
            continue
        required = Tags.from_json(cand["required"])
        prompt = image_prompt(cand["caption"], required, policy.image_style, policy.negative_prompt)
        cand["image_prompt"] = prompt.text()
        try:
            image = t2i.generate(prompt, cand["seeds"]["t2i"])
        except Exception as e:  # noqa: BLE001 - a backend failure drops this candidate only
            cand.update(status="rejected", reason=f"t2i_error: {type(e).__name__}: {e}")
            continue
        data = png_bytes(image)
        match = coverage(tagger.tag(data), required, cfg.image_cover)
        cand.setdefault("scores", {})["image_match"] = round(match, 4)
        if match < cfg.tau_image:
            cand.update(status="rejected", reason="image_filter")
            continue
        cand["status"] = "accepted"
        images[cand["path"]] = data
    return images
