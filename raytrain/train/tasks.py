"""What a training job trains: its data, its batches, its loss. The one loop in `loop.py` runs every task.

A task has two halves. `prepare` runs in the driver before any worker starts: it builds the Ray Datasets and the
text-side files the run keeps with its checkpoints (the LM tokenizer, CatLIP's synset vocabulary, CLIP's caption
tokenizer, the class names of a classifier) and may fix the model config to them (CatLIP's classifier has one row
per vocabulary synset). `Worker` runs on each rank: it turns dataset batches into model inputs, computes the loss
and the parts of it that are logged, updates per-step state (CatLIP's EMA) and chooses the weights the `model/`
export holds.

Tasks (`task.name`): `lm` (next-token pretraining, the default; `objective=distill` adds AFM's frozen teacher),
`catlip` (multi-label BCE over WordNet synsets), `clip` (contrastive image-text baseline), `classify` (linear probe
or fine-tune of a ViT on labelled images, with Transfer Init from a CatLIP checkpoint), `specstream` (Speculative
Streaming: a decoder fine-tuned with LoRA for self-speculation on prompt/completion pairs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raytrain.config import ConfigError, to_dataclass
from raytrain.data import imagetext, sft, synsets, text
from raytrain.data.tokenizer import TokenizerFiles, caption_tokens, from_files, load_tokenizer, to_files, train_bpe
from raytrain.models.decoder import DecoderConfig, training_flops_per_token
from raytrain.models.streams import StreamConfig
from raytrain.models.vit import ViTConfig, to_pixels, training_flops_per_image
from raytrain.train.objectives import (IGNORE_INDEX, METRICS, info_nce, label_smoothed_ce, multilabel_bce,
                                       next_token_pairs, ngram_loss, ngram_targets)

log = logging.getLogger("raytrain.train")
VOCAB_FILE, CLASSES_FILE = "synsets.json", "classes.json"


# ---- configs (`task:` in conf/train.yaml and conf/job/*.yaml) --------------------------------------------------

@dataclass
class LMTaskConfig:
    name: str = "lm"


@dataclass
class CatlipTaskConfig:
    name: str = "catlip"
    vocab: str | None = None  # an existing vocabulary file; None = count the training captions (saved in the run)
    top_k: int | None = 24320  # keep the k most frequent synsets (None = no cap)
    min_count: int = 1  # and only synsets seen at least this often (the paper's V_tau; 500 at web scale)
    counting: str = "caption"  # caption (once per caption) | occurrence
    check_captions: int = 1000  # captions sampled to fingerprint the data set and check the vocabulary covers it
    ema_momentum: float = 0.0005  # ema = (1 - m) ema + m w; 0 = no EMA (the export then holds the raw weights)


@dataclass
class ClipTaskConfig:
    name: str = "clip"
    gather: bool = True  # score each rank's rows against the features of every rank (the global batch)
    tokenizer: str | None = None  # existing tokenizer directory; None = a BPE trained on the captions
    tokenizer_captions: int = 20000  # captions the BPE is trained on


@dataclass
class ClassifyTaskConfig:
    name: str = "classify"
    mode: str = "linear_probe"  # linear_probe (frozen trunk, head only) | finetune (everything)
    backbone: str | None = None  # a CatLIP (ViT) checkpoint whose trunk starts the model; None = from scratch
    transfer_init: bool = True  # head rows from the backbone classifier's rows for each class's synset
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("linear_probe", "finetune"):
            raise ValueError(f"mode={self.mode!r}; expected linear_probe or finetune")


@dataclass
class SpecStreamTaskConfig:
    """Speculative Streaming fine-tuning (spec 2.2 and 3): the model is `init`'s decoder with γ streams in its top
    `msa_layers` layers; trained are LoRA on every projection, the stream embeddings and the pruning adapter."""

    name: str = "specstream"
    init: str | None = None  # the checkpoint to fine-tune (its weights stay frozen under LoRA)
    gamma: int = 4  # speculative streams
    msa_layers: int | None = None  # Ns; None = n_layers // 6 (the paper's choice for SQL), at least 1
    pruning_rank: int = 8  # θ of the tree-pruning adapter; 0 = no adapter
    lora_rank: int = 32
    lora_alpha: float = 32.0
    main_weight: float = 1.0  # α_0 of Eq. 5
    stream_weight: float = 0.1  # α_j of Eq. 5, every stream
    early_exit_weight: float = 1.0  # the adapter's next-token CE (its input is detached: it trains the adapter only)

    def __post_init__(self) -> None:
        if not self.init:
            raise ValueError("init=CHECKPOINT is required: the decoder checkpoint to fine-tune")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 1")

    def model(self, base: DecoderConfig) -> DecoderConfig:
        """`base` with this task's streams."""
        ns = self.msa_layers if self.msa_layers is not None else max(1, base.n_layers // 6)
        streams = StreamConfig(gamma=self.gamma, msa_layers=ns, pruning_rank=self.pruning_rank)
        return dataclasses.replace(base, streams=streams, name=base.name.removesuffix("-specstream") + "-specstream")


TASK_CONFIGS = {"lm": LMTaskConfig, "catlip": CatlipTaskConfig, "clip": ClipTaskConfig,
                "classify": ClassifyTaskConfig, "specstream": SpecStreamTaskConfig}


def task_config(node: Any) -> Any:
    node = node or {}
    name = node.get("name", "lm")
    if name not in TASK_CONFIGS:
        raise ConfigError(f"task.name={name!r} is unknown; known: {', '.join(TASK_CONFIGS)}")
    return to_dataclass(TASK_CONFIGS[name], node, "task")


def data_config(task: Any, node: Any) -> Any:
    cls = {LMTaskConfig: text.TextDataConfig, SpecStreamTaskConfig: sft.PairsDataConfig}.get(
        type(task), imagetext.ImageTextDataConfig)
    return to_dataclass(cls, node, "data")


def fit_model(task: Any, model: Any) -> Any:
    """The model a task trains: `model=`'s, or for `specstream` the init checkpoint's decoder with streams (its
    config.json is read here, so a bad `init` fails before Ray starts)."""
    if not isinstance(task, SpecStreamTaskConfig):
        return model
    from raytrain.checkpoint.hf import read_model_config
    from raytrain.config import RaytrainError

    try:
        base = read_model_config(task.init)
    except RaytrainError as e:
        raise ConfigError(f"init={task.init}: {e}") from None
    if not isinstance(base, DecoderConfig):
        raise ConfigError(f"init={task.init} holds a {type(base).__name__}; Speculative Streaming needs a decoder")
    try:
        return task.model(base)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None


# ---- driver side -----------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    datasets: dict[str, Any]  # "train" (and more) Ray Datasets
    files: TokenizerFiles  # saved with every checkpoint; their fingerprint must match on resume
    pad_id: int
    model: Any  # the model config, possibly fitted to the files (vocabulary size, class count)


def prepare(parts: dict[str, Any], run_dir: str, counter: Any = None) -> Prepared:
    """Build datasets and run files for `parts` (the typed config groups); `counter` sums skipped records."""
    task = parts["task"]
    if isinstance(task, LMTaskConfig):
        from raytrain.train.trainer import prepare_tokenizer

        files = prepare_tokenizer(parts["data"], run_dir, parts["model"].vocab_size)
        return Prepared({"train": text.build_dataset(parts["data"], files)}, files, from_files(files).pad_token_id,
                        parts["model"])
    return {CatlipTaskConfig: _prepare_catlip, ClipTaskConfig: _prepare_clip, ClassifyTaskConfig: _prepare_classify,
            SpecStreamTaskConfig: _prepare_specstream}[type(task)](parts, run_dir, counter)


def _prepare_specstream(parts: dict[str, Any], run_dir: str, counter: Any) -> Prepared:
    """The init checkpoint's tokenizer, and its pairs tokenized into training rows."""
    from raytrain.checkpoint.hf import resolve_checkpoint

    task, data, model = parts["task"], parts["data"], parts["model"]
    if parts["trainer"].zero_stage == 3:
        raise ConfigError("task=specstream loads the init weights into whole parameters on every rank: use "
                          "trainer.zero_stage <= 2 (the trained parameters are a small fraction anyway)")
    if data.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len={data.seq_len} exceeds the init model's max_seq_len={model.max_seq_len}")
    directory = resolve_checkpoint(task.init)
    if not (directory / "tokenizer.json").is_file():
        raise ConfigError(f"init={task.init} holds no tokenizer.json; the pairs are tokenized with the model's own")
    files = to_files(load_tokenizer(directory))
    return Prepared({"train": sft.build_dataset(data, files, counter)}, files, 0, model)


def _prepare_catlip(parts: dict[str, Any], run_dir: str, counter: Any) -> Prepared:
    task, data, model = parts["task"], parts["data"], parts["model"]
    if not isinstance(model, ViTConfig) or not model.num_classes:
        raise ConfigError(f"task=catlip trains a ViT with a classifier; model={model.name} is not one")
    vocab = catlip_vocabulary(task, data, run_dir)
    if model.num_classes != len(vocab):
        log.info("model.num_classes=%d -> %d, the vocabulary's size", model.num_classes, len(vocab))
        model = dataclasses.replace(model, num_classes=len(vocab))
    train = imagetext.decoded(imagetext.read_records(data, counter), data, True, counter).map_batches(
        Labeler, fn_constructor_kwargs={"vocab_json": vocab.to_json(), "counter": counter}, batch_size=64,
        batch_format="numpy", compute=_one_actor())
    return Prepared({"train": train}, {VOCAB_FILE: vocab.to_json()}, 0, model)


def _one_actor() -> Any:
    import ray.data

    return ray.data.ActorPoolStrategy(size=1)


def catlip_vocabulary(task: CatlipTaskConfig, data: imagetext.ImageTextDataConfig,
                      run_dir: str) -> synsets.Vocabulary:
    """`task.vocab` if set, else the one saved in the run (resume), else counted now over the training captions and
    saved in the run directory. A given vocabulary built on other data is reported; one that labels none of the
    sampled captions is refused."""
    sample = [r["caption"] for r in imagetext.captions(data, task.check_captions).take_all()]
    source = synsets.fingerprint(sample)
    saved = Path(run_dir) / VOCAB_FILE
    if task.vocab:
        vocab = synsets.Vocabulary.load(task.vocab)
    elif saved.is_file():
        vocab = synsets.Vocabulary.load(saved)
    else:
        log.info("counting WordNet synsets over the training captions (Ray Data)")
        vocab = synsets.build_vocabulary(imagetext.captions(data), source, task.top_k, task.min_count,
                                         task.counting)
        vocab.save(saved)
        log.info("vocabulary: %d synsets, saved to %s", len(vocab), saved)
    synsets.check_source(vocab, sample, source, str(task.vocab or saved), data.path or "the procedural world")
    return vocab


class Labeler:
    """Ray Data actor: captions -> multi-hot targets (N, V) uint8; captions with no vocabulary synset get a zero
    target (still trained on, as in the reference) and are counted."""

    def __init__(self, vocab_json: str, counter: Any = None) -> None:
        self.vocab = synsets.Vocabulary.from_json(vocab_json, "run vocabulary")
        self.counter = counter

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        targets = np.zeros((len(batch["caption"]), len(self.vocab)), dtype=np.uint8)
        empty = 0
        for row, caption in zip(targets, batch["caption"]):
            labels = self.vocab.labels(str(caption))
            row[labels] = 1
            empty += not labels
        if empty and self.counter is not None:
            self.counter.add.remote("captions_without_labels", empty)
        return {"image": batch["image"], "targets": targets}


def _prepare_clip(parts: dict[str, Any], run_dir: str, counter: Any) -> Prepared:
    from raytrain.train.trainer import read_run_files, write_run_files

    task, data, model = parts["task"], parts["data"], parts["model"]
    if not hasattr(model, "text"):
        raise ConfigError(f"task=clip trains an image and a text tower; model={model.name} is not a CLIP model")
    if task.tokenizer:
        files = to_files(load_tokenizer(task.tokenizer))
    elif not (files := read_run_files(run_dir, "tokenizer")):
        sample = (r["caption"] for r in imagetext.captions(data, task.tokenizer_captions).iter_rows())
        files = to_files(train_bpe(sample, model.text.vocab_size))
        write_run_files(run_dir, "tokenizer", files)
    tok = from_files(files)
    if len(tok) > model.text.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but model.text.vocab_size={model.text.vocab_size}")
    length = min(data.caption_tokens, model.text.max_seq_len)
    train = imagetext.decoded(imagetext.read_records(data, counter), data, True, counter).map_batches(
        tokenize_captions, fn_kwargs={"files_json": json.dumps(files), "length": length}, batch_size=64,
        batch_format="numpy")
    return Prepared({"train": train}, files, tok.pad_token_id, model)


def tokenize_captions(batch: dict[str, Any], files_json: str, length: int) -> dict[str, Any]:
    """Captions -> BOS + ids + EOS cut or right-padded to `length` (EOS kept), and the real lengths."""
    tok = text._cached_tokenizer(str(hash(files_json)), files_json)
    tokens, lengths = caption_tokens(tok, [str(c) for c in batch["caption"]], length)
    return {"image": batch["image"], "tokens": tokens, "lengths": lengths}


def _prepare_classify(parts: dict[str, Any], run_dir: str, counter: Any) -> Prepared:
    """The procedural world's labelled shapes (data.path=null), or an ImageNet-style folder `data.path/<class>/`."""
    data, model = parts["data"], parts["model"]
    if data.path is None:
        classes = list(data.world.shapes)
        rows = imagetext.procedural(0, data.samples, data.seed, data.world, labelled=True)
    else:
        classes = imagetext.image_folder_classes(data.path)
        rows = imagetext.image_folder(data.path, classes)
    model = dataclasses.replace(model, num_classes=len(classes))
    train = imagetext.decoded(rows, data, True, counter).select_columns(["image", "label"])
    return Prepared({"train": train}, {CLASSES_FILE: json.dumps(classes)}, 0, model)


# ---- worker side -----------------------------------------------------------------------------------------------

class Worker:
    """Per-rank behaviour of a task; see the module docstring. Subclasses set `metrics` (names of the logged loss
    parts, the total first) and implement `inputs` and `loss`."""

    metrics: tuple[str, ...] = ("loss",)
    unit = "images"
    dtypes: Any = None  # dtype that `iter_torch_batches` converts columns to (None: as stored)

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.job, self.model, self.dtype, self.device = job, model, dtype, device

    def inputs(self, batch: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, the detached logged parts (len(metrics),))"""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called once per optimizer step."""

    def export_state(self) -> dict[str, torch.Tensor] | None:
        """Weights for `model/` (None: the model's own)."""
        return None

    def restore(self, export_dir: Path) -> None:
        """Reload per-task state from a checkpoint's `model/` export."""

    def units_per_sample(self) -> int:
        return 1

    def flops_per_unit(self) -> float | None:
        cfg = self.job.model
        image = cfg if isinstance(cfg, ViTConfig) else getattr(cfg, "image", None)
        return training_flops_per_image(image, self.job.data.image_size) if image is not None else None

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return to_pixels(images).to(self.dtype)


class LMWorker(Worker):
    """Next-token prediction: cross-entropy + z-loss, or with `objective.name=distill` against a mix of a frozen
    teacher's prediction and the label (the teacher is loaded whole on every rank and never enters DeepSpeed)."""

    unit = "tokens"
    dtypes = torch.int64

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        from raytrain.train.engine import loss_function

        super().__init__(job, model, dtype, device)
        self.metrics = ("loss", *METRICS[job.objective.name])
        self.loss_fn = loss_function(job.trainer, job.objective)
        self.teacher = self._teacher() if job.objective.name == "distill" else None

    def _teacher(self) -> torch.nn.Module:
        from raytrain.checkpoint.hf import load_pretrained
        from raytrain.train.engine import apply_model_options

        teacher = load_pretrained(self.job.objective.teacher, device=self.device, dtype=self.dtype).model
        apply_model_options(teacher.requires_grad_(False), self.job.trainer)  # compiled like the student
        return teacher.eval()

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return next_token_pairs(batch["tokens"], self.job.pad_id)  # rows of seq_len + 1 tokens

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = inputs
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(tokens)
        loss, *parts = self.loss_fn(engine(tokens), labels, teacher_logits)
        return loss, torch.stack([loss.detach(), *parts])

    def units_per_sample(self) -> int:
        return self.job.data.seq_len

    def flops_per_unit(self) -> float | None:
        return training_flops_per_token(self.job.model, self.job.data.seq_len)


class CatlipWorker(Worker):
    metrics = ("loss", "labels_per_image")

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        from raytrain.train.ema import EMA

        super().__init__(job, model, dtype, device)
        if job.task.ema_momentum and job.trainer.zero_stage == 3:
            raise ConfigError("task.ema_momentum needs whole weights on every rank: use trainer.zero_stage <= 2")
        self.ema = EMA(model, job.task.ema_momentum) if job.task.ema_momentum else None

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels(batch["image"]), batch["targets"]

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = inputs
        loss = multilabel_bce(engine(images), targets)
        return loss, torch.stack([loss.detach(), targets.float().sum(1).mean()])

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def export_state(self) -> dict[str, torch.Tensor] | None:
        return self.ema.state if self.ema is not None else None

    def restore(self, export_dir: Path) -> None:
        if self.ema is not None:
            from raytrain.checkpoint.hf import read_weights

            self.ema.load(read_weights(export_dir))


class ClipWorker(Worker):
    metrics = ("loss", "logit_scale")

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.pixels(batch["image"]), batch["tokens"].long(), batch["lengths"].long()

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, text_features, scale = engine(*inputs)
        loss = info_nce(image, text_features, scale, gather=self.job.task.gather)
        return loss, torch.stack([loss.detach(), scale.detach().float()])


class ClassifyWorker(Worker):
    metrics = ("loss", "accuracy")

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(job, model, dtype, device)
        task = job.task
        if task.backbone:
            rows = init_from_backbone(model, task.backbone, json.loads(job.tokenizer_files[CLASSES_FILE]),
                                      task.transfer_init)
            log.info("Transfer Init: %d of %d classifier rows from %s", sum(r is not None for r in rows), len(rows),
                     task.backbone)
        if task.mode == "linear_probe":
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("head."))

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels(batch["image"]), batch["label"].long()

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = inputs
        if self.job.task.mode == "linear_probe":
            self.model.stem.eval()  # a frozen trunk keeps its BatchNorm statistics
        logits = engine(images)
        loss = label_smoothed_ce(logits, labels, self.job.task.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return loss, torch.stack([loss.detach(), accuracy])


class SpecStreamWorker(Worker):
    """Speculative Streaming fine-tuning (spec 2.2): `init`'s weights, frozen, with LoRA on every projection; the
    stream embeddings and the pruning adapter train beside it. Loss: Eq. 5 on the completion tokens (the main stream
    at every completion position; stream j at the same positions, its label j tokens further on), plus the
    adapter's next-token CE. The export folds LoRA into the weights: the checkpoint is the init decoder with streams,
    20·h parameters more at γ = 4, θ = 8."""

    unit = "tokens"
    dtypes = torch.int64

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        from raytrain.models.lora import add_lora

        super().__init__(job, model, dtype, device)
        task = job.task
        _load_base(model, task.init)
        lora = add_lora(model, task.lora_rank, task.lora_alpha)
        model.stream_embed.requires_grad_(True)
        if model.prune_adapter is not None:
            model.prune_adapter.requires_grad_(True)
        self.gamma = model.cfg.streams.gamma
        self.weights = [task.main_weight] + [task.stream_weight] * self.gamma
        self.metrics = ("loss", "main_ce", "stream_ce")
        if model.prune_adapter is not None:
            self.weights.append(task.early_exit_weight)
            self.metrics += ("early_exit_ce",)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("specstream: %d LoRA parameters; %d trained in all (%.2f%% of %d)", lora, trained,
                 100 * trained / sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters()))

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """-> tokens (B, T); labels (B, T, 1 + γ) of the main stream and each stream, completion tokens only;
        stream rows (B, R), the completion positions that get streams, and which of them only pad a shorter
        completion (they repeat its last position and go unlabelled)."""
        lengths, prompt_lengths = batch["lengths"], batch["prompt_lengths"]
        tokens = batch["tokens"][:, :int(lengths.max())]  # no column of padding only
        inputs = tokens[:, :-1]
        position = torch.arange(inputs.shape[1], device=tokens.device)
        completion = (position >= prompt_lengths[:, None] - 1) & (position < lengths[:, None] - 1)
        labels = ngram_targets(torch.where(completion, tokens[:, 1:], IGNORE_INDEX), self.gamma)
        count = lengths - prompt_lengths  # labelled positions per row
        r = torch.arange(int(count.max()), device=tokens.device)
        rows = torch.minimum(prompt_lengths[:, None] - 1 + r, lengths[:, None] - 2)
        return inputs, labels, rows, r[None] >= count[:, None]

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels, rows, padding = inputs
        states = engine.module.forward_streams(tokens, stream_rows=rows)
        stream_labels = labels.gather(1, rows[..., None].expand(-1, -1, labels.shape[-1]))[..., 1:]
        stream_labels = stream_labels.masked_fill(padding[..., None], IGNORE_INDEX)
        hidden = [states.main, *states.streams.unbind(2)]
        targets = [labels[..., 0], *stream_labels.unbind(-1)]
        if states.early_exit is not None:
            hidden.append(states.early_exit)
            targets.append(labels[..., 0])
        loss, ces = ngram_loss(hidden, targets, self.model.logits, self.weights)
        logged = [loss.detach(), ces[0], ces[1:self.gamma + 1].mean(), *ces[self.gamma + 1:]]
        return loss, torch.stack(logged)

    def export_state(self) -> dict[str, torch.Tensor] | None:
        from raytrain.models.lora import merged_state

        return merged_state(self.model)

    def units_per_sample(self) -> int:
        return self.job.data.seq_len


def _load_base(model: torch.nn.Module, init: str) -> None:
    """`init`'s weights into `model` (any checkpoint layout `load_pretrained` reads); the stream parameters keep
    their initialisation unless `init` has them too."""
    from raytrain.checkpoint.hf import load_pretrained, model_state

    state = model_state(load_pretrained(init).model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = {name for name, _ in model.named_parameters() if name.startswith(("stream_embed", "prune_adapter."))}
    if unexpected or set(missing) - new - {"head.weight"}:
        raise ConfigError(f"init={init} does not fit the model with streams (missing {sorted(set(missing) - new)[:3]},"
                          f" unexpected {unexpected[:3]})")


WORKERS = {LMTaskConfig: LMWorker, CatlipTaskConfig: CatlipWorker, ClipTaskConfig: ClipWorker,
           ClassifyTaskConfig: ClassifyWorker, SpecStreamTaskConfig: SpecStreamWorker}


def worker(job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> Worker:
    return WORKERS[type(job.task or LMTaskConfig())](job, model, dtype, device)


# ---- Transfer Init ---------------------------------------------------------------------------------------------

def class_synset(name: str) -> str | None:
    """The synset of a class: its name if it is a wnid (`n02084071`), else the synset the caption rule gives the
    name as one word (`goldfish` -> n01443537), else None."""
    if len(name) == 9 and name[0] == "n" and name[1:].isdigit():
        return name
    found = synsets.caption_synsets(name) if " " not in name.strip() else []
    return found[0] if found else None


def transfer_rows(classes: list[str], vocab_ids: list[str]) -> list[int | None]:
    """For each class, the row of the CatLIP classifier that holds its synset (None: unmapped or not in the
    vocabulary, left randomly initialised)."""
    index = {sid: i for i, sid in enumerate(vocab_ids)}
    return [index.get(class_synset(c) or "") for c in classes]


@torch.no_grad()
def transfer_init(head: torch.nn.Linear, source_weight: torch.Tensor, source_bias: torch.Tensor,
                  rows: list[int | None]) -> None:
    for i, row in enumerate(rows):
        if row is not None:
            head.weight[i].copy_(source_weight[row])
            head.bias[i].copy_(source_bias[row])


def init_from_backbone(model: torch.nn.Module, backbone: str, classes: list[str],
                       use_transfer_init: bool) -> list[int | None]:
    """Load a CatLIP checkpoint's trunk into `model` and, with Transfer Init, the classifier rows of the classes'
    synsets; returns the source row of each class."""
    from raytrain.checkpoint.hf import read_weights, resolve_checkpoint

    path = resolve_checkpoint(backbone)
    state = read_weights(path)
    head_w, head_b = state.pop("head.weight", None), state.pop("head.bias", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"head.weight", "head.bias"}:
        raise ConfigError(f"task.backbone={backbone}: not a ViT trunk of this model's shape "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    rows: list[int | None] = [None] * len(classes)
    if use_transfer_init and head_w is not None and (path / VOCAB_FILE).is_file():
        vocab = synsets.Vocabulary.load(path / VOCAB_FILE)
        rows = transfer_rows(classes, vocab.ids)
        transfer_init(model.head, head_w, head_b, rows)
    elif use_transfer_init:
        log.warning("task.backbone=%s has no classifier or no %s; the head starts random", backbone, VOCAB_FILE)
    return rows

