"""CtrlSynth: does its data help a CLIP trained at equal steps, and how fast is the pipeline on Ray Data.

1. Writes `--records` pairs of the procedural world (alt-text-like captions that leave out attributes, relations
   and sometimes objects) as webdataset shards, and runs `raytrain synth` (CtrlSynth-mix: SP1 + SP2 + SP3, policy
   keep) over them on a local Ray cluster with 1, then 2 actors per stage: pipeline throughput (pairs/s).
2. Trains the same tiny CLIP twice for `--steps` steps of `--batch` pairs: on the real pairs only (baseline), and
   on batches half real, half CtrlSynth (spec 3.4: 1:1 per batch, equal iterations, trap 6). BPE trained on the
   real captions serves both. `--with-duplicates` adds a third arm on CtrlSynth data synthesized without dedupe
   (trap 11), the same seeds.
3. Evaluates on held-out images: zero-shot shape classification of one-object images ("a circle", ...), zero-shot
   colour classification ("a red shape", ...), a compositional test on two-object scenes (the true caption against
   an attribute-swapped and a relation-swapped one, SugarCrepe-style), and image->text retrieval R@1 among the
   held-out pairs' full descriptions.

The LLM is `--llm template` (spec 3.5's deterministic writer) by default: SmolLM2-135M on this CPU decodes a few
tokens per second, too slow for thousands of captions; `--llm CHECKPOINT` runs the real one.

`--device cuda --llm CHECKPOINT`: the caption stage alone on one GPU (no Ray): SP1 + SP2 prompts of
`--gpu-records` procedural records decoded by the engine with continuous batching (captions/s, text-filter pass
rate per path) against the same engine fed one record (two requests) at a time (the baseline, 16 records).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from catlip_vs_clip import TEXT_TINY, VIT_TINY  # noqa: E402

from raytrain.data import imagetext, shapes  # noqa: E402
from raytrain.data.tokenizer import train_bpe  # noqa: E402
from raytrain.models.clip import ClipConfig, build_clip  # noqa: E402
from raytrain.models.vit import ViTConfig, to_pixels  # noqa: E402
from raytrain.pipelines.ctrlsynth import runner  # noqa: E402
from raytrain.pipelines.ctrlsynth.config import PoolConfig, SynthConfig  # noqa: E402
from raytrain.pipelines.ctrlsynth.llm import LLMConfig  # noqa: E402
from raytrain.pipelines.ctrlsynth.tags import INVERSE  # noqa: E402
from raytrain.train.objectives import info_nce  # noqa: E402

WORLD = shapes.WorldConfig()
IMAGE_CFG = imagetext.ImageTextDataConfig(image_size=64)


# ---- data and the pipeline -------------------------------------------------------------------------------------

def write_pairs(root: Path, n: int, shard_size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, shard_size):
        records = (shapes.sample(i, 0, WORLD) for i in range(start, min(n, start + shard_size)))
        imagetext.write_shard(root / f"shard-{start:06d}.tar",
                              ((r["key"], {"png": r["image"], "txt": r["caption"].encode()}) for r in records))


def synthesize(pairs: Path, out: Path, workers: int, llm: LLMConfig, dedupe: bool = True) -> dict:
    import ray

    cfg = SynthConfig(llm=llm, pool=PoolConfig(taggers=workers, llms=workers, t2i=workers, cpus=0.25), dedupe=dedupe)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        return runner.run(cfg, imagetext.ImageTextDataConfig(path=str(pairs)), str(out))
    finally:
        ray.shutdown()


def read_pairs(out: Path) -> list[tuple[bytes, str, str]]:
    """(image, caption, path) of every synthesized pair."""
    found = []
    for shard in sorted(out.glob("*/pairs.tar")):
        with open(shard, "rb") as f:
            for row in imagetext.tar_samples(f, str(shard)):
                found.append((row["image"], row["caption"], row["key"].rsplit("_", 1)[1].upper()))
    return found


def pixels(images: list[bytes]) -> torch.Tensor:
    batch = imagetext.decode_batch({"key": [str(i) for i in range(len(images))], "image": images}, IMAGE_CFG,
                                   False, None)
    return to_pixels(torch.from_numpy(batch["image"]))


# ---- training ---------------------------------------------------------------------------------------------------

class Texts:
    def __init__(self, captions: list[str]) -> None:
        self.tok = train_bpe(captions, TEXT_TINY.vocab_size)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[self.tok.bos_token_id, *t[:30], self.tok.eos_token_id]
               for t in self.tok(captions, add_special_tokens=False)["input_ids"]]
        tokens = torch.full((len(ids), 32), self.tok.pad_token_id)
        for row, t in zip(tokens, ids):
            row[:len(t)] = torch.tensor(t)
        return tokens, torch.tensor([len(t) for t in ids])


def train_clip(sources: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: int, batch: int,
               seed: int) -> torch.nn.Module:
    """`sources`: (images, tokens, lengths) sets; each batch takes an equal share from each."""
    torch.manual_seed(seed)
    clip = build_clip(ClipConfig(name="clip_tiny", image=ViTConfig(**{**VIT_TINY.__dict__, "num_classes": 0}),
                                 text=TEXT_TINY, embed_dim=64))
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.2)
    share = batch // len(sources)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        parts = [[t[idx] for t in s] for s in sources for idx in [torch.randint(0, len(s[0]), (share,),
                                                                                  generator=gen)]]
        images, tokens, lengths = (torch.cat(x) for x in zip(*parts))
        loss = info_nce(*clip(images, tokens, lengths))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clip.eval()


# ---- evaluation -------------------------------------------------------------------------------------------------

def phrase(o: shapes.SceneObject, colour: str | None = None) -> str:
    return f"a {o.size} {colour or o.colour} {o.shape}"


def eval_sets(n: int) -> dict:
    """Held-out images (seeds the training data never used)."""
    rng = random.Random(11)
    single = [shapes.generate_scene(rng, WORLD, shape=rng.choice(WORLD.shapes)) for _ in range(n)]
    pairs, captions, negatives = [], [], []
    while len(pairs) < n:
        scene = shapes.generate_scene(rng, WORLD)
        a, b = scene.objects[:2] if len(scene.objects) >= 2 else (None, None)
        if a is None or a.colour == b.colour or a.shape == b.shape:
            continue
        rel = next(r.predicate for r in scene.relations if r.subject == 0 and r.object == 1)
        said = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
        pairs.append(shapes.png_bytes(shapes.render(shapes.Scene([a, b], scene.background,
                                                                 shapes.spatial_relations([a, b])))))
        captions.append(f"{phrase(a)} {said[rel]} {phrase(b)}")
        negatives.append({"attribute": f"{phrase(a, b.colour)} {said[rel]} {phrase(b, a.colour)}",
                          "relation": f"{phrase(a)} {said[INVERSE[rel]]} {phrase(b)}"})
    return {"single": [shapes.png_bytes(shapes.render(s)) for s in single],
            "shape": torch.tensor([WORLD.shapes.index(s.objects[0].shape) for s in single]),
            "colour": torch.tensor([list(shapes.COLOURS).index(s.objects[0].colour) for s in single]),
            "pairs": pairs, "captions": captions, "negatives": negatives}


@torch.no_grad()
def evaluate(clip: torch.nn.Module, texts: Texts, sets: dict) -> dict:
    def text_features(captions: list[str]) -> torch.Tensor:
        return clip.encode_text(*texts(captions))

    image_single = clip.encode_image(pixels(sets["single"]))
    shape_zero = (image_single @ text_features([f"a {s}" for s in WORLD.shapes]).T).argmax(1)
    colour_zero = (image_single @ text_features([f"a {c} shape" for c in shapes.COLOURS]).T).argmax(1)
    image_pairs = clip.encode_image(pixels(sets["pairs"]))
    true = (image_pairs * text_features(sets["captions"])).sum(1)
    compositional = {kind: ((image_pairs * text_features([n[kind] for n in sets["negatives"]])).sum(1) < true)
                     .float().mean().item() for kind in ("attribute", "relation")}
    retrieval = (image_pairs @ text_features(sets["captions"]).T).argmax(1)
    return {"zero_shot_shape": (shape_zero == sets["shape"]).float().mean().item(),
            "zero_shot_colour": (colour_zero == sets["colour"]).float().mean().item(),
            "compositional_attribute": compositional["attribute"], "compositional_relation":
                compositional["relation"], "retrieval_r1": (retrieval == torch.arange(len(retrieval))).float()
                .mean().item()}


def gpu_captions(args: argparse.Namespace) -> dict:
    from raytrain.infer.engine import Engine, EngineConfig
    from raytrain.pipelines.ctrlsynth import synthesize
    from raytrain.pipelines.ctrlsynth.llm import EngineWriter
    from raytrain.pipelines.ctrlsynth.tagger import TemplateTagger

    llm = LLMConfig(checkpoint=args.llm, max_batch_size=args.gpu_batch)
    cfg = SynthConfig(paths=["SP1", "SP2"], llm=llm)
    engine = Engine.from_checkpoint(args.llm, EngineConfig(max_batch_size=args.gpu_batch, max_model_len=1024),
                                    device="cuda", dtype=torch.bfloat16)
    writer = EngineWriter(engine, llm)
    tagger = TemplateTagger()

    def prompts(n: int) -> list[dict]:
        states = []
        for i in range(n):
            r = shapes.sample(i, 0, WORLD)
            state = synthesize.new_state()
            synthesize.decompose(state, r["image"], tagger)
            synthesize.control(state, r["key"], r["caption"], cfg)
            states.append(state)
        return states

    def timed(states: list[dict], batch: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(states), batch):
            synthesize.recompose_text(states[i:i + batch], writer, cfg)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    synthesize.recompose_text(prompts(8), writer, cfg)  # warm-up: CUDA graphs, allocator
    batched = prompts(args.gpu_records)
    seconds = timed(batched, len(batched))
    single = prompts(16)
    single_seconds = timed(single, 1)
    for state in batched:
        synthesize.filter_text(state, cfg)
    cands = [c for s in batched for c in s["candidates"]]
    rate = {p: sum(c["status"] == "accepted" for c in cands if c["path"] == p)
            / max(1, sum(c["path"] == p for c in cands)) for p in cfg.paths}
    tokens = sum(len(engine.tokenizer.encode(c.get("raw", ""), add_special_tokens=False)) for c in cands)
    captions_per_s = len(cands) / seconds
    baseline = 2 * len(single) / single_seconds
    return {"config": {"llm": args.llm, "records": args.gpu_records, "captions": len(cands), "paths": cfg.paths,
                       "max_batch_size": args.gpu_batch, "dtype": "bf16", "max_new_tokens": llm.max_new_tokens},
            "results": {"captions_per_s": captions_per_s, "output_tokens_per_s": tokens / seconds,
                        "text_pass_rate": rate, "example_captions": [c.get("caption") for c in cands[:6]]},
            "baseline": {"captions_per_s_one_record_at_a_time": baseline},
            "ratio": captions_per_s / baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--throughput-records", type=int, default=160, help="records of the 1-actor run")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per arm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llm", default="template", help="template, or an instruct checkpoint directory")
    parser.add_argument("--work", default="/tmp/ctrlsynth_bench")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arm", default="both", choices=["both", "real", "ctrlsynth"], help="train one arm only")
    parser.add_argument("--synthesized", default=None, help="an earlier run's CtrlSynth output directory")
    parser.add_argument("--with-duplicates", action="store_true",
                        help="a third arm: the CtrlSynth data synthesized without dedupe (spec trap 11)")
    parser.add_argument("--gpu-records", type=int, default=256)
    parser.add_argument("--gpu-batch", type=int, default=64)
    args = parser.parse_args()
    if args.device == "cuda":
        print(json.dumps({"benchmark": "ctrlsynth_captions", "device": torch.cuda.get_device_name(),
                          **gpu_captions(args), "command": " ".join([Path(sys.executable).name, *sys.argv])}))
        return
    torch.set_num_threads(args.threads)
    llm = LLMConfig(backend="template") if args.llm == "template" else LLMConfig(checkpoint=args.llm)
    work = Path(args.work)
    os.makedirs(work, exist_ok=True)
    load = os.getloadavg()[0]

    if args.synthesized:  # train on an earlier run's CtrlSynth output: no pipeline, no throughput
        mix, throughput = {"out": args.synthesized, "pass_rate": None, "rejected": None}, None
    else:
        small, full = work / "pairs_small", work / "pairs"
        write_pairs(small, args.throughput_records, 40)
        write_pairs(full, args.records, 100)
        one = synthesize(small, work / f"out1_{time.time_ns()}", 1, llm)
        two = synthesize(small, work / f"out2_{time.time_ns()}", 2, llm)
        mix = synthesize(full, work / f"mix_{time.time_ns()}", 2, llm)
        throughput = {f"{n}_actor_per_stage": {"pairs_per_s": s["pairs"] / s["seconds"],
                                               "records_per_s": s["records_per_s"], "seconds": s["seconds"]}
                      for n, s in ((1, one), (2, two))}

    real = [shapes.sample(i, 0, WORLD) for i in range(args.records)]
    synthetic = read_pairs(Path(mix["out"]))
    texts = Texts([r["caption"] for r in real])
    real_set = (pixels([r["image"] for r in real]), *texts([r["caption"] for r in real]))
    synth_set = (pixels([s[0] for s in synthetic]), *texts([s[1] for s in synthetic]))
    duplicated = read_pairs(Path(synthesize(full, work / f"dup_{time.time_ns()}", 2, llm, dedupe=False)["out"])) \
        if args.with_duplicates and not args.synthesized else []
    duplicated_set = (pixels([s[0] for s in duplicated]), *texts([s[1] for s in duplicated])) if duplicated else None
    sets = eval_sets(args.eval)
    arms: dict[str, list[dict]] = {"real": [], "ctrlsynth": [], "with_duplicates": []}
    start = time.perf_counter()
    for seed in range(args.seeds):
        if args.arm in ("both", "real"):
            arms["real"].append(evaluate(train_clip([real_set], args.steps, args.batch, seed), texts, sets))
            print(f"seed {seed}: real {arms['real'][-1]} at {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if args.arm in ("both", "ctrlsynth"):
            arms["ctrlsynth"].append(evaluate(train_clip([real_set, synth_set], args.steps, args.batch, seed),
                                              texts, sets))
        if duplicated_set is not None:
            arms["with_duplicates"].append(evaluate(train_clip([real_set, duplicated_set], args.steps, args.batch,
                                                               seed), texts, sets))
    arms = {arm: runs for arm, runs in arms.items() if runs}
    mean = {arm: {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]} for arm, runs in arms.items()}
    if len(mean) == 1:  # one arm of a split run: its figures only
        print(json.dumps({"benchmark": "ctrlsynth_arm", "arm": args.arm, "results": mean[args.arm],
                          "command": " ".join([Path(sys.executable).name, *sys.argv])}))
        return
    print(json.dumps({
        "benchmark": "ctrlsynth", "device": "cpu",
        "config": {"records": args.records, "steps": args.steps, "batch": args.batch, "seeds": args.seeds,
                   "mix": "1:1 real:CtrlSynth per batch", "paths": ["SP1", "SP2", "SP3"], "policy": "keep",
                   "llm": args.llm, "t2i": "procedural renderer", "model": "clip_tiny (vit_tiny 64 px + 2-layer text)",
                   "eval_images": args.eval, "load_average": load, "train_seconds": time.perf_counter() - start},
        "results": {**mean["ctrlsynth"], "per_seed": arms["ctrlsynth"], "synthetic_pairs": len(synthetic),
                    "pass_rate": mix["pass_rate"], "rejected": mix["rejected"], "throughput": throughput,
                    "scaling_1_to_2": throughput and throughput["2_actor_per_stage"]["pairs_per_s"]
                    / throughput["1_actor_per_stage"]["pairs_per_s"]},
        "with_duplicates": mean.get("with_duplicates") and {**mean["with_duplicates"], "synthetic_pairs":
                                                            len(duplicated), "per_seed": arms["with_duplicates"]},
        "baseline": {**mean["real"], "per_seed": arms["real"]},
        "ratio": mean["ctrlsynth"]["compositional_attribute"] / max(mean["real"]["compositional_attribute"], 1e-9),
        "command": " ".join([Path(sys.executable).name, *sys.argv])}))


if __name__ == "__main__":
    main()
