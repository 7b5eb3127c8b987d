"""CtrlSynth's two vision tagging models of the procedural world on the same held-out scenes: the neural tagger
(trained here on scene records, `raytrain/pipelines/ctrlsynth/neural_tagger.py`) against the template tagger (the
baseline): exact-read rate (objects, attributes and relations all equal to the scene record) and milliseconds per
image. Prints one JSON line.

    python benchmarks/ctrlsynth_tagger.py --out outputs/tagger --scenes 4000 --steps 3000 --heldout 500
    python benchmarks/ctrlsynth_tagger.py --checkpoint outputs/tagger --heldout 500    # a trained one, no training
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

from raytrain.data import shapes  # noqa: E402
from raytrain.pipelines.ctrlsynth.neural_tagger import META, NeuralTagger, exact_reads, train_tagger  # noqa: E402
from raytrain.pipelines.ctrlsynth.tagger import TaggerConfig, TemplateTagger  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="outputs/tagger", help="where a newly trained tagger goes")
    p.add_argument("--checkpoint", help="measure this trained tagger instead of training one")
    p.add_argument("--scenes", type=int, default=4000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--heldout-seed", type=int, default=101, help="a seed no training run of the tagger used")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        training = train_tagger(args.out, scenes=args.scenes, steps=args.steps)
    else:  # how that checkpoint was trained, as its trainer wrote it
        training = json.loads((Path(args.checkpoint) / META).read_text())
    neural = NeuralTagger.load(TaggerConfig(kind="neural", checkpoint=args.checkpoint or args.out))
    held = [shapes.generate_scene(shapes.sample_rng(args.heldout_seed, i), shapes.WorldConfig())
            for i in range(args.heldout)]
    results = {}
    for name, tagger in (("neural", neural), ("templates", TemplateTagger())):
        start = time.perf_counter()
        rate = exact_reads(tagger, held, 64)
        results[name] = {"exact_read": rate, "ms_per_image": 1e3 * (time.perf_counter() - start) / len(held),
                         "version": tagger.version}
    print(json.dumps({"benchmark": "ctrlsynth_tagger", "heldout_scenes": len(held), "heldout_seed": args.heldout_seed,
                      "results": {"neural": results["neural"]}, "baseline": {"templates": results["templates"]},
                      "training": training, "threads": args.threads, "torch": torch.__version__,
                      "objects_per_scene": float(np.mean([len(s.objects) for s in held])),
                      "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
