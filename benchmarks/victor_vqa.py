"""Held-out VQA exact match of Victor against its baselines, trained with the same steps, in one run.

The parts: the image tower is a CatLIP run on the procedural world (`--tower`); the decoder is `vlm_tiny`'s 8-layer
decoder pretrained here as a language model (`raytrain train`, its own BPE) on the training split's text, captions
of the scenes and question/answer lines without the images (or `--decoder CKPT`), so that Stage 1 aligns to a
decoder that knows the words, as LLaVA's does. Then each variant runs `job=vlm` (Ray Train + DeepSpeed, both recipe
stages: captions with tower and decoder frozen, then the questions with the decoder trained; the same data, parts,
steps, batch and seed): the LLaVA baseline (`vlm.mode=off`), Victor with M = 8 and M = 32 (k = 3), Victor M = 8
dropping after layer k = 5 (the paper's k sweep), registers without the drop (M = 8, k = n), and Victor M = 8 with
`register_init: pooled` (each image's visual tokens pooled into the 8 registers, plus their learned weight) or
`image_token` (every register starts as the decoder's embedding of "Image", the paper's other initialisation). FastV
(the 8 visual tokens that received the most attention in layer k-1 survive layer k = 3) is applied at inference to
the baseline's weights, as the paper compares it. Every run shares one local Ray cluster, and a run that finished
under `--storage` earlier is reused. Each model answers the held-out split (scenes no training record shows) greedily
through `raytrain.infer.vlm.answer`; exact match after `vqa.normalise`, overall and per question kind with 95% Wilson
intervals, each variant's difference to the baseline on the same questions with its paired 95% interval, and the
process CPU time of the evaluation. Prints one JSON line; `ratio` is Victor-8's accuracy over the baseline's.

`--local` is the small version for a machine too busy for Ray: every variant trains in its own process (`--jobs`
at a time), one stage on the questions from one shared random start (the tower random: frozen, or trained with the
rest under `--train-tower`, since a random frozen tower carries too little of the image), the same rows, steps and
schedule; the JSON line adds the answer prior (each kind's most frequent training answer) on the same questions.

    python benchmarks/victor_vqa.py --data DIR --tower RUN --storage DIR [--align-steps 40 --finetune-steps 250]
        [--variants baseline victor_8 ...] [--override model.image.image_size=64 model.image.pos_grid=4 ...]
    python benchmarks/victor_vqa.py --data DIR --storage DIR --local --train-tower --finetune-steps 1500 --jobs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from raytrain.checkpoint.hf import latest_run_checkpoint, load_pretrained, read_model_config  # noqa: E402
from raytrain.data.vqa import caption, normalise  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.infer.vlm import answer, pixels  # noqa: E402
from raytrain.models.vlm import VictorConfig  # noqa: E402

from lazyllm_ttft import paired_difference_ci, wilson  # noqa: E402

TRAINED = {"baseline": ["vlm.mode=off"], "victor_8": ["vlm.registers=8"], "victor_32": ["vlm.registers=32"],
           "victor_8_k5": ["vlm.registers=8", "vlm.drop_layer=5"],  # the paper's k sweep: k = 5 loses nothing
           "registers_8_no_drop": ["vlm.registers=8", "vlm.drop_layer=99"],
           "victor_8_pooled": ["vlm.registers=8", "vlm.register_init=pooled"],  # registers = pooled image + weight
           "victor_8_image_token": ["vlm.registers=8", "vlm.register_init=image_token"]}  # = embedding of "Image"
DECODER = ["model=openelm_tiny", "model.name=vlm_tiny_decoder", "model.vocab_size=512", "model.n_layers=8",
           "model.layer_scaling=null", "++model.q_heads=4", "++model.kv_heads=2", "++model.ffn_dim=384",
           "model.max_seq_len=512", "model.qk_norm=false"]  # vlm_tiny's decoder (conf/model/vlm_tiny.yaml)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from raytrain.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def finished(run_dir: Path, steps: int) -> Path | None:
    latest = latest_run_checkpoint(run_dir)
    if latest is not None and json.loads((latest / "model" / "raytrain.json").read_text())["step"] == steps:
        return latest / "model"
    return None


def pretrain_decoder(args: argparse.Namespace) -> Path:
    """vlm_tiny's decoder as a language model on the training split's text (captions, questions and answers)."""
    from raytrain.commands import train

    run = f"{args.prefix}-decoder"
    if (done := finished(Path(args.storage) / run, args.decoder_steps)) is not None:
        return done
    import pyarrow.parquet as pq

    corpus = Path(args.storage) / f"{run}-text.jsonl"
    table = pq.read_table(Path(args.data) / "train", columns=["key", "scene", "question", "answer"]).to_pylist()
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"text": f"{caption(r['key'], r['scene'])}\nQuestion: {r['question']}"
                                                  f"\nAnswer: {r['answer']}"}) + "\n" for r in table))
    train.run(compose([*DECODER, "data=text", f"data.path={corpus}", "data.seq_len=64", "data.min_chars=1",
                       "data.min_tokens=1", "data.packing=true", "data.shuffle_buffer=256",
                       f"trainer.max_steps={args.decoder_steps}", f"trainer.checkpoint_every={args.decoder_steps}",
                       "trainer.micro_batch_size=16", "schedule.warmup_steps=20", "optim.lr=3e-3",
                       f"trainer.storage_path={args.storage}", f"trainer.run_name={run}", "tracking=disabled",
                       "sample.prompt=null"]))
    return finished(Path(args.storage) / run, args.decoder_steps)


def train_variant(name: str, extra: list[str], decoder: Path, args: argparse.Namespace) -> Path:
    """The variant's final checkpoint, training it first unless its run finished earlier."""
    from raytrain.commands import train

    run = f"{args.prefix}-{name}"
    if (done := finished(Path(args.storage) / run / f"{run}.finetune", args.finetune_steps)) is not None:
        return done
    tower = ["recipe.stages.finetune.task.freeze=[]"] if args.train_tower else []
    outcome = train.run(compose(["job=vlm", *extra, f"data.path={args.data}", f"task.image_tower={args.tower}",
                                 f"task.decoder={decoder}", f"trainer.storage_path={args.storage}",
                                 f"trainer.run_name={run}", f"recipe.stages.align.steps={args.align_steps}",
                                 f"recipe.stages.finetune.steps={args.finetune_steps}",
                                 f"trainer.micro_batch_size={args.batch}", "tracking=disabled", *tower,
                                 *args.override]))
    return Path(outcome["outputs"]["finetune"]) / "model"


def heldout(args: argparse.Namespace) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(args.data) / "heldout", columns=["image", "question", "answer", "kind"]).to_pylist()
    return rows[:args.heldout]


def evaluate(checkpoint: Path, rows: list[dict], victor: VictorConfig | None, batch: int) -> dict:
    config = read_model_config(checkpoint)
    if victor is not None:
        config = dataclasses.replace(config, victor=victor)
    pretrained = load_pretrained(checkpoint, config=config)
    return {**exact_match(pretrained.model, pretrained.tokenizer, rows, batch), "checkpoint": str(checkpoint)}


@torch.no_grad()
def exact_match(model: torch.nn.Module, tok, rows: list[dict], batch: int) -> dict:
    """Greedy answers to the held-out rows: exact match overall and per kind, and the CPU time it took."""
    model.eval()
    size = model.cfg.image.image_size
    hits = []
    start = time.process_time()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        answers = answer(model, tok, [r["question"] for r in chunk], [pixels(r["image"], size) for r in chunk],
                         SamplingParams(max_new_tokens=6, temperature=0.0))
        hits += [normalise(a) == normalise(r["answer"]) for r, a in zip(chunk, answers)]
    return {**scores(rows, hits), "eval_cpu_s": time.process_time() - start,
            "victor": dataclasses.asdict(model.cfg.victor), "hits": hits}


def scores(rows: list[dict], hits: list[bool]) -> dict:
    """Exact match overall and per question kind, each with its 95% Wilson interval and count."""
    def cell(outcomes: list[bool]) -> dict:
        low, high = wilson(sum(outcomes), len(outcomes), 1.959964)
        return {"em": round(sum(outcomes) / len(outcomes), 4), "ci95": [round(low, 4), round(high, 4)],
                "n": len(outcomes)}

    per_kind = defaultdict(list)
    for r, hit in zip(rows, hits):
        per_kind[r["kind"]].append(hit)
    overall = cell(hits)
    return {"exact_match": overall["em"], "ci95": overall["ci95"],
            "per_kind": {k: cell(v) for k, v in sorted(per_kind.items())}}


def answer_prior(train: list[dict], rows: list[dict]) -> dict:
    """What answering without the image scores: each kind's most frequent training answer, on the held-out rows."""
    counts = defaultdict(lambda: defaultdict(int))
    for r in train:
        counts[r["kind"]][normalise(r["answer"])] += 1
    guess = {kind: max(c, key=c.get) for kind, c in counts.items()}
    return scores(rows, [guess.get(r["kind"]) == normalise(r["answer"]) for r in rows])


def training_answers(data: str) -> list[dict]:
    """The kind and answer of every training row of a `raytrain data make=vqa` directory (for the answer prior)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(data) / "train", columns=["kind", "answer"]).to_pylist()


LOCAL = {"baseline": {"mode": "off"}, "victor_8": {"num_registers": 8}, "victor_32": {"num_registers": 32},
         "victor_8_k5": {"num_registers": 8, "drop_layer": 5},
         "registers_8_no_drop": {"num_registers": 8, "drop_layer": 8},  # vlm_tiny's decoder has 8 layers
         "victor_8_pooled": {"num_registers": 8, "register_init": "pooled"},
         "victor_8_image_token": {"num_registers": 8, "register_init": "image_token"}}


def local_variants(args: argparse.Namespace, rows: list[dict]) -> tuple[dict, dict]:
    """`--local`: every variant trained without Ray, one process each (`--jobs` at a time), one stage on the
    questions from the same random start (vlm_tiny; projector, registers and decoder trained, the tower too with
    `--train-tower`, else frozen; a BPE trained on the questions), with the same rows, steps, batch, AdamW and
    warmup-cosine schedule as job=vlm's finetune stage. Also returns the answer prior of those training rows."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow.parquet as pq

    from raytrain.data.tokenizer import to_files, train_bpe

    table = pq.read_table(Path(args.data) / "train", columns=["key", "image", "question", "answer", "kind", "scene"])
    train = table.slice(0, args.finetune_steps * args.batch).to_pylist()
    files = to_files(train_bpe((f"Question: {r['question']}\nAnswer: {r['answer']}" for r in train), 512))
    recipe = {"steps": args.finetune_steps, "batch_size": args.batch, "lr": args.lr, "train_tower": args.train_tower}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(train_local, name, LOCAL[name], files, train, rows, recipe)
                   for name in args.variants}
        results = {}
        for name, future in futures.items():
            results.update(future.result())
    return results, answer_prior(train, rows)


def train_local(name: str, victor: dict, files: dict, train: list[dict], rows: list[dict], recipe: dict) -> dict:
    """One variant of `local_variants`: trained, then evaluated (the baseline's weights also under FastV)."""
    from raytrain.data.tokenizer import from_files
    from raytrain.models.registry import build_model

    torch.set_num_threads(1)
    model, train_cpu_s, final_loss = fit_local(victor, files, train, recipe)
    tok = from_files(files)
    results = {name: {**exact_match(model, tok, rows, 50), "train_cpu_s": train_cpu_s, "final_loss": final_loss}}
    if name == "baseline":
        fastv = build_model(dataclasses.replace(model.cfg, victor=VictorConfig(mode="fastv", keep_visual=8)))
        fastv.load_state_dict(model.state_dict())
        results["fastv_8"] = exact_match(fastv, tok, rows, 50)
    print(json.dumps({"partial": results}), file=sys.stderr, flush=True)  # a run cut short keeps its figures
    return results


def fit_local(victor: dict, files: dict, train: list[dict], recipe: dict) -> tuple[torch.nn.Module, float, float]:
    """vlm_tiny with the `victor` keys, from the start every variant shares, trained on `train` in order (wrapping
    around when the steps need more rows): the model, the training CPU seconds and the last step's loss."""
    import math

    import numpy as np
    from omegaconf import OmegaConf

    from raytrain.data.vqa import Tokenize, VQADataConfig
    from raytrain.models.registry import build_model, model_config
    from raytrain.models.vit import to_pixels
    from raytrain.models.vlm import VLMBatch
    from raytrain.train.tasks import init_registers_from_word, set_trainable

    tokenize = Tokenize(files, VQADataConfig())
    base = model_config(OmegaConf.load(ROOT / "conf/model/vlm_tiny.yaml"))
    torch.manual_seed(0)
    start = build_model(dataclasses.replace(base, victor=VictorConfig(mode="off"))).state_dict()
    torch.manual_seed(1)  # registers drawn alike in every variant; everything else is the shared start
    model = build_model(dataclasses.replace(base, victor=VictorConfig(**victor)))
    model.load_state_dict(start, strict=False)
    if model.cfg.victor.register_init == "image_token":
        init_registers_from_word(model, files)
    steps, batch_size, lr = recipe["steps"], recipe["batch_size"], recipe["lr"]
    set_trainable(model, [] if recipe["train_tower"] else ["image"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    clock = time.process_time()
    for step in range(steps):
        chunk = [train[(step * batch_size + i) % len(train)] for i in range(batch_size)]
        b = tokenize({k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]})
        tokens, length = torch.from_numpy(b["tokens"]), torch.from_numpy(b["length"])
        batch = VLMBatch(tokens, torch.arange(tokens.shape[1])[None] < length[:, None],
                         torch.from_numpy(b["image_at"]), images=to_pixels(torch.from_numpy(b["image"])),
                         labels=torch.from_numpy(b["labels"]))
        model.train()
        if not recipe["train_tower"]:
            model.image.eval()  # a frozen tower keeps its BatchNorm statistics, as in job=vlm
        for group in optimizer.param_groups:  # 9 warmup steps, then cosine to 0
            group["lr"] = lr * min(1.0, (step + 1) / 9) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return model, time.process_time() - clock, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a `raytrain data make=vqa` directory")
    parser.add_argument("--tower", default=None, help="the image tower checkpoint (a CatLIP or CLIP run; required "
                                                        "without --local)")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--decoder", default=None, help="a decoder checkpoint of vlm_tiny's shape; default: "
                                                             "pretrained here")
    parser.add_argument("--prefix", default="vqa")
    parser.add_argument("--decoder-steps", type=int, default=300)
    parser.add_argument("--align-steps", type=int, default=40)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--override", nargs="*", default=[], help="more `raytrain train` overrides for every run")
    parser.add_argument("--local", action="store_true", help="train the variants in local processes (no Ray, random "
                                                             "tower, one stage): see `local_variants`")
    parser.add_argument("--train-tower", action="store_true", help="train the tower in the question stage too (the "
                                                                   "spec keeps it frozen)")
    parser.add_argument("--lr", type=float, default=1e-3, help="--local: peak learning rate")
    parser.add_argument("--jobs", type=int, default=len(LOCAL), help="--local: variants trained at once")
    parser.add_argument("--variants", nargs="*", default=list(LOCAL), choices=list(LOCAL),
                        help="the variants to train, baseline and victor_8 among them (FastV comes with the baseline)")
    args = parser.parse_args()
    if args.tower is None and not args.local:
        parser.error("--tower is required without --local")
    if not {"baseline", "victor_8"} <= set(args.variants):
        parser.error("--variants needs baseline and victor_8 (the differences, the ratio and FastV's k use them)")
    torch.set_num_threads(1)
    rows = heldout(args)
    decoder, prior = None, None
    if args.local:
        results, prior = local_variants(args, rows)
    else:
        decoder = Path(args.decoder) if args.decoder else pretrain_decoder(args)
        checkpoints = {name: train_variant(name, TRAINED[name], decoder, args) for name in args.variants}
        results = {name: evaluate(path, rows, None, 50) for name, path in checkpoints.items()}
        drop = read_model_config(checkpoints["victor_8"]).victor.drop_layer
        results["fastv_8"] = evaluate(checkpoints["baseline"], rows, VictorConfig(mode="fastv", keep_visual=8,
                                                                                  drop_layer=drop), 50)
        prior = answer_prior(training_answers(args.data), rows)
    for name, r in results.items():
        print(f"{name}: exact match {r['exact_match']:.4f} {r['ci95']}", file=sys.stderr)
    baseline = results.pop("baseline")
    for r in results.values():  # the difference to the baseline on the same questions, with its 95% interval
        r["minus_baseline"] = round(r["exact_match"] - baseline["exact_match"], 4)
        r["minus_baseline_ci95"] = [round(x, 4) for x in paired_difference_ci(baseline["hits"], r.pop("hits"))]
    baseline.pop("hits")
    print(json.dumps({
        "benchmark": "victor_vqa", "device": f"cpu ({os.cpu_count()} cores)",
        "config": {"data": args.data, "tower": args.tower, "decoder": str(decoder), "heldout": len(rows),
                   "local": args.local,
                   "decoder_steps": args.decoder_steps, "align_steps": args.align_steps,
                   "finetune_steps": args.finetune_steps, "micro_batch_size": args.batch,
                   "train_tower": args.train_tower, "lr": args.lr, "override": args.override},
        "results": results, "baseline": baseline, "answer_prior": prior,
        "ratio": results["victor_8"]["exact_match"] / max(baseline["exact_match"], 1e-9),
        "command": "python " + " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
