"""CtrlSynth's two vision tagging models of the procedural world on the same held-out scenes: the neural tagger
(trained here on scene records, `raytrain/pipelines/ctrlsynth/neural_tagger.py`) against the template tagger (the
baseline): exact-read rate (objects, attributes and relations all equal to the scene record) and milliseconds per
image. Prints one JSON line.

`--catlip RUN` adds the CatLIP tagger (`raytrain/pipelines/ctrlsynth/catlip_tagger.py`, a `raytrain train job=catlip`
run): per-object precision and recall of its object classes against the records' object nouns (per image, at the
spec's top-20 / score >= 0.3 and at a few other thresholds), and the exact-read rate of each region tagger united
with it against the region tagger alone.

    python benchmarks/ctrlsynth_tagger.py --out outputs/tagger --scenes 4000 --steps 3000 --heldout 500
    python benchmarks/ctrlsynth_tagger.py --checkpoint outputs/tagger --heldout 500    # a trained one, no training
    python benchmarks/ctrlsynth_tagger.py --checkpoint outputs/tagger --catlip outputs/runs/RUN --heldout 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.checkpoint.hf import resolve_checkpoint  # noqa: E402
from raytrain.data import shapes  # noqa: E402
from raytrain.pipelines.ctrlsynth.neural_tagger import META, NeuralTagger, exact_reads, train_tagger  # noqa: E402
from raytrain.pipelines.ctrlsynth.catlip_tagger import CatlipClassifier, CatlipTagger, kept, union  # noqa: E402
from raytrain.pipelines.ctrlsynth.tagger import CatlipTaggerConfig, TaggerConfig, TemplateTagger  # noqa: E402

SWEEP = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # thresholds the class precision / recall is also reported at


def timed_exact_read(tagger, held: list[shapes.Scene]) -> dict:
    start = time.perf_counter()
    rate = exact_reads(tagger, held, 64)
    return {"exact_read": rate, "ms_per_image": 1e3 * (time.perf_counter() - start) / len(held),
            "version": tagger.version}


def class_quality(classifier: CatlipClassifier, held: list[shapes.Scene]) -> dict:
    """Per-object precision / recall of the object classes against each record's set of object nouns, micro-averaged
    over the images, at each threshold of SWEEP (top_k fixed)."""
    counts = {t: [0, 0, 0] for t in SWEEP}  # true positives, predicted, actual
    for scene in held:
        scores = classifier.scores(np.asarray(shapes.render(scene, 64)))
        truth = {o.shape for o in scene.objects}
        for t in SWEEP:
            found = {classifier.nouns[i] for i in kept(scores, classifier.cfg.top_k, t)} & set(shapes.SHAPES)
            counts[t] = [counts[t][0] + len(found & truth), counts[t][1] + len(found), counts[t][2] + len(truth)]
    return {str(t): {"precision": tp / pred if pred else None, "recall": tp / actual}
            for t, (tp, pred, actual) in counts.items()}


def added_objects(merged: CatlipTagger, held: list[shapes.Scene]) -> dict:
    """Objects the union adds to the region tagger's per image, and the share of them the record has."""
    added = right = 0
    for scene in held:
        image = np.asarray(shapes.render(scene, 64))
        region = merged.region.tag_image(image)  # what merged.tag_image unites, read once
        new = union(region, merged.catlip.objects(image)).objects[len(region.objects):]
        added += len(new)
        right += len(set(new) & {o.shape for o in scene.objects})
    return {"added_per_image": added / len(held), "added_in_record": right / added if added else None}


def catlip_results(path: str, regions: dict, held: list[shapes.Scene]) -> dict:
    classifier = CatlipClassifier.load(CatlipTaggerConfig(checkpoint=path))
    merged = {name: CatlipTagger(tagger, classifier) for name, tagger in regions.items()}
    trained = json.loads((resolve_checkpoint(path) / "raytrain.json").read_text())  # run, step, images seen
    return {"checkpoint": path, "trained": trained, "version": classifier.version, "classes": len(classifier.nouns),
            "top_k": classifier.cfg.top_k, "threshold": classifier.cfg.threshold,
            "object_classes": class_quality(classifier, held),
            "merged": {f"{name}+catlip": {**timed_exact_read(m, held), **added_objects(m, held)}
                       for name, m in merged.items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="outputs/tagger", help="where a newly trained tagger goes")
    p.add_argument("--checkpoint", help="measure this trained tagger instead of training one")
    p.add_argument("--scenes", type=int, default=4000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--heldout-seed", type=int, default=101, help="a seed no training run of the tagger used")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--catlip", help="a CatLIP run or checkpoint: measure the CatLIP tagger too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        training = train_tagger(args.out, scenes=args.scenes, steps=args.steps)
    else:  # how that checkpoint was trained, as its trainer wrote it
        training = json.loads((Path(args.checkpoint) / META).read_text())
    neural = NeuralTagger.load(TaggerConfig(kind="neural", checkpoint=args.checkpoint or args.out))
    held = [shapes.generate_scene(shapes.sample_rng(args.heldout_seed, i), shapes.WorldConfig())
            for i in range(args.heldout)]
    regions = {"neural": neural, "templates": TemplateTagger()}
    results = {name: timed_exact_read(tagger, held) for name, tagger in regions.items()}
    catlip = catlip_results(args.catlip, regions, held) if args.catlip else None
    print(json.dumps({"benchmark": "ctrlsynth_tagger", "heldout_scenes": len(held), "heldout_seed": args.heldout_seed,
                      "results": {"neural": results["neural"]}, "baseline": {"templates": results["templates"]},
                      **({"catlip": catlip} if catlip else {}),
                      "training": training, "threads": args.threads, "torch": torch.__version__,
                      "objects_per_scene": float(np.mean([len(s.objects) for s in held])),
                      "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
