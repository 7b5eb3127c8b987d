"""What a training job trains: its data, its batches, its loss. The one loop in `loop.py` runs every task.

A task has two halves. `prepare` runs in the driver before any worker starts: it builds the Ray Datasets and the
text-side files the run keeps with its checkpoints (the LM tokenizer, CatLIP's synset vocabulary, CLIP's caption
tokenizer, the class names of a classifier) and may fix the model config to them (CatLIP's classifier has one row
per vocabulary synset). `Worker` runs on each rank: it turns dataset batches into model inputs, computes the loss
and the parts of it that are logged, updates per-step state (CatLIP's EMA) and chooses the weights the `model/`
export holds.

Tasks (`task.name`): `lm` (next-token pretraining, the default; `objective=distill` adds AFM's frozen teacher),
`lora` (LoRA adapters on a frozen base, dense or compressed, with the same objectives: AFM's feature and
accuracy-recovery adapters), `catlip` (multi-label BCE over WordNet synsets, plus RangeAugment's loss when the ViT
learns augmentation ranges), `clip` (contrastive image-text baseline), `classify` (linear probe or fine-tune of a ViT
on labelled images, with Transfer Init from a CatLIP checkpoint). Image tasks with `data.variable_resolution` re-cut
each worker's batches into corenet's multi-scale batches (`regroup`). `vlm` (a LLaVA-style vision-language model
with Victor's registers on visual question answering; its parts `task.freeze` names stay frozen, and a first run
starts from a checkpoint the driver assembles from an image tower and a decoder). `specstream` (Speculative
Streaming: a decoder fine-tuned with LoRA for self-speculation on prompt/completion pairs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raytrain.config import ConfigError, RaytrainError, to_dataclass
from raytrain.data import imagetext, sft, synsets, text, vqa
from raytrain.data.tokenizer import TokenizerFiles, caption_tokens, from_files, load_tokenizer, to_files, train_bpe
from raytrain.data.variable_batch import batch_shapes, variable_batches
from raytrain.models.decoder import DecoderConfig, training_flops_per_token
from raytrain.models.lora import LoRAConfig
from raytrain.models.range_augment import range_augment_loss, target_mse
from raytrain.models.streams import StreamConfig
from raytrain.models.vit import ViTConfig, to_pixels, training_flops_per_image
from raytrain.models.vlm import VLMBatch, VLMConfig
from raytrain.train.objectives import (IGNORE_INDEX, METRICS, info_nce, label_smoothed_ce, multilabel_bce,
                                       next_token_pairs, ngram_loss, ngram_targets)

log = logging.getLogger("raytrain.train")
VOCAB_FILE, CLASSES_FILE = "synsets.json", "classes.json"
TRANSFER_BIASES = ("copy", "mean", "none")


# ---- configs (`task:` in conf/train.yaml and conf/job/*.yaml) --------------------------------------------------

@dataclass
class LMTaskConfig:
    name: str = "lm"


@dataclass
class LoRATaskConfig(LMTaskConfig):
    """Language modelling through LoRA adapters on a frozen base (`raytrain train job=lora init=CHECKPOINT`)."""

    name: str = "lora"
    base: str | None = None  # the frozen base: a checkpoint, dense or compressed (`init=`)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapter_init: str | None = None  # an adapter of the same base to start from (AFM: the accuracy-recovery one)
    base_fingerprint: str | None = None  # set by the driver (`raytrain.checkpoint.adapter.base_fingerprint`)

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError("init=CHECKPOINT is required: the base the adapter is trained on")


@dataclass
class CatlipTaskConfig:
    name: str = "catlip"
    vocab: str | None = None  # an existing vocabulary file (cut by top_k and min_count too); None = count the
    # training captions (saved in the run)
    top_k: int | None = 24320  # keep the k most frequent synsets (None = no cap)
    min_count: int = 1  # and only synsets seen at least this often (the paper's V_tau; 500 at web scale)
    counting: str = "caption"  # caption (once per caption) | occurrence
    noun_only: bool = False  # the paper's noun filter (the reference code ignores the part of speech)
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
    transfer_bias: str = "mean"  # copy: biases too, unmapped classes 0 | mean: copied, unmapped classes get their mean
    # | none: weights only, every bias 0 (BCE biases of rare synsets are strongly negative: unmapped classes at 0
    # would start ahead under softmax)
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("linear_probe", "finetune"):
            raise ValueError(f"mode={self.mode!r}; expected linear_probe or finetune")
        if self.transfer_bias not in TRANSFER_BIASES:
            raise ValueError(f"transfer_bias={self.transfer_bias!r}; expected one of {', '.join(TRANSFER_BIASES)}")


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
        _ = self.lora  # LoRAConfig raises ValueError on a bad rank or alpha

    @property
    def lora(self) -> LoRAConfig:
        """LoRA on every projection of every block, q, k, v and gate, up as separate pairs, B zero, scale α / r."""
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha)

    def model(self, base: DecoderConfig) -> DecoderConfig:
        """`base` with this task's streams."""
        ns = self.msa_layers if self.msa_layers is not None else max(1, base.n_layers // 6)
        streams = StreamConfig(gamma=self.gamma, msa_layers=ns, pruning_rank=self.pruning_rank)
        return dataclasses.replace(base, streams=streams, name=base.name.removesuffix("-specstream") + "-specstream")



VLM_PARTS = ("image", "projector", "registers", "decoder")


@dataclass
class VLMTaskConfig:
    name: str = "vlm"
    image_tower: str | None = None  # a ViT (CatLIP), CLIP or VLM checkpoint whose image trunk starts the tower
    decoder: str | None = None  # a decoder-family checkpoint (e.g. SmolLM2-135M-Instruct) that starts the decoder
    tokenizer: str | None = None  # None: the decoder checkpoint's, else the run's, else a BPE trained on the data
    tokenizer_texts: int = 20000  # records whose questions and answers train that BPE
    freeze: list[str] = dataclasses.field(default_factory=lambda: ["image"])  # image | projector | registers | decoder

    def __post_init__(self) -> None:
        unknown = sorted(set(self.freeze) - set(VLM_PARTS))
        if unknown:
            raise ValueError(f"freeze: unknown part {unknown[0]!r}; parts are {', '.join(VLM_PARTS)}")
        if set(VLM_PARTS) <= set(self.freeze):
            raise ValueError("freeze: every part is frozen; nothing would train")


TASK_CONFIGS = {"lm": LMTaskConfig, "lora": LoRATaskConfig, "catlip": CatlipTaskConfig, "clip": ClipTaskConfig,
                "classify": ClassifyTaskConfig, "vlm": VLMTaskConfig, "specstream": SpecStreamTaskConfig}


def task_config(node: Any) -> Any:
    node = node or {}
    name = node.get("name", "lm")
    if name not in TASK_CONFIGS:
        raise ConfigError(f"task.name={name!r} is unknown; known: {', '.join(TASK_CONFIGS)}")
    return to_dataclass(TASK_CONFIGS[name], node, "task")


def data_config(task: Any, node: Any) -> Any:
    kinds = {LMTaskConfig: text.TextDataConfig, VLMTaskConfig: vqa.VQADataConfig,
             SpecStreamTaskConfig: sft.PairsDataConfig}  # LoRATaskConfig is an LMTaskConfig: language-model data
    cls = next((c for t, c in kinds.items() if isinstance(task, t)), imagetext.ImageTextDataConfig)
    return to_dataclass(cls, node, "data")


def fit_model(task: Any, model: Any) -> Any:
    """The model a task trains: `model=`'s, or for `specstream` the init checkpoint's decoder with streams (its
    config.json is read here, so a bad `init` fails before Ray starts)."""
    if not isinstance(task, SpecStreamTaskConfig):
        return model
    from raytrain.checkpoint.hf import read_model_config

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
    init_from: str | None = None  # weights the run starts from when it has none (the VLM assembled from its parts)


def prepare(parts: dict[str, Any], run_dir: str, counter: Any = None) -> Prepared:
    """Build datasets and run files for `parts` (the typed config groups); `counter` sums skipped records. LoRA fits
    `parts` to its base in place (model config, tokenizer, trainer.init_from)."""
    task = parts["task"]
    if isinstance(task, LoRATaskConfig):
        fit_to_base(parts)
    if isinstance(task, LMTaskConfig):
        from raytrain.train.trainer import prepare_tokenizer

        files = prepare_tokenizer(parts["data"], run_dir, parts["model"].vocab_size)
        return Prepared({"train": text.build_dataset(parts["data"], files)}, files, from_files(files).pad_token_id,
                        parts["model"])
    return {CatlipTaskConfig: _prepare_catlip, ClipTaskConfig: _prepare_clip, ClassifyTaskConfig: _prepare_classify,
            VLMTaskConfig: _prepare_vlm, SpecStreamTaskConfig: _prepare_specstream}[type(task)](parts, run_dir,
                                                                                                counter)


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


def fit_to_base(parts: dict[str, Any]) -> None:
    """A LoRA job trains on its base's model config and tokenizer, starts from its weights (trainer.init_from) and
    records its fingerprint; `adapter_init` must be an adapter of this base with the same LoRA shape."""
    from raytrain.checkpoint.adapter import base_fingerprint, check_base, read_adapter
    from raytrain.checkpoint.hf import read_model_config, resolve_checkpoint
    from raytrain.data.tokenizer import fingerprint

    task, data, t = parts["task"], parts["data"], parts["trainer"]
    try:
        base = resolve_checkpoint(task.base)
        model = read_model_config(base)
    except RaytrainError as e:
        raise ConfigError(f"init: {e}") from None
    if t.zero_stage == 3:
        raise ConfigError("job=lora keeps the frozen base whole on every rank: use trainer.zero_stage <= 2")
    if not (base / "tokenizer.json").is_file():
        raise ConfigError(f"init={task.base} holds no tokenizer.json; an adapter trains with its base's tokenizer")
    if data.tokenizer and fingerprint(to_files(load_tokenizer(data.tokenizer))) != fingerprint(
            {"tokenizer.json": (base / "tokenizer.json").read_text()}):
        raise ConfigError(f"data.tokenizer={data.tokenizer} is not the tokenizer of init={task.base}; leave it unset")
    if data.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len={data.seq_len} exceeds the base's max_seq_len={model.max_seq_len}")
    digest = base_fingerprint(base)
    if task.adapter_init:
        try:
            adapter = read_adapter(task.adapter_init)
            check_base(adapter, digest, base)
        except RaytrainError as e:
            raise ConfigError(f"adapter_init: {e}") from None
        if dataclasses.replace(adapter.lora, dropout=task.lora.dropout) != task.lora:
            raise ConfigError(f"adapter_init={task.adapter_init} has LoRA settings {adapter.lora}; this job's lora "
                              f"settings are {task.lora} (rank, alpha, targets and splits must match)")
    parts.update(model=model, data=dataclasses.replace(data, tokenizer=str(base)),
                 task=dataclasses.replace(task, base=str(base), base_fingerprint=digest),
                 trainer=dataclasses.replace(t, init_from=str(base)))


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
    """`task.vocab` if set (its first `task.top_k` synsets counted at least `task.min_count` times, as corenet takes
    the first V keys), else the one saved in the run (resume), else counted now over the training captions and saved
    in the run directory. A given vocabulary built on other data is reported; one that labels none of the sampled
    captions is refused."""
    sample = [r["caption"] for r in imagetext.captions(data, task.check_captions).take_all()]
    source = synsets.fingerprint(sample)
    saved = Path(run_dir) / VOCAB_FILE
    if task.vocab:
        vocab = synsets.Vocabulary.load(task.vocab).truncated(task.top_k, task.min_count)
        if vocab.noun_only != task.noun_only:
            raise ConfigError(f"task.noun_only={task.noun_only}, but task.vocab={task.vocab} was mined with "
                              f"noun_only={vocab.noun_only}; labels must be mined as the vocabulary was")
    elif saved.is_file():
        vocab = synsets.Vocabulary.load(saved)
    else:
        log.info("counting WordNet synsets over the training captions (Ray Data)")
        vocab = synsets.build_vocabulary(imagetext.captions(data), source, task.top_k, task.min_count,
                                         task.counting, noun_only=task.noun_only)
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


def _prepare_vlm(parts: dict[str, Any], run_dir: str, counter: Any) -> Prepared:
    """VQA rows tokenized around their images; the tokenizer (see `vlm_tokenizer`); and, for a run that starts from
    no checkpoint, the VLM assembled from `task.image_tower` and `task.decoder` (saved once in `run_dir/init`), also
    when neither is given but the registers start from a word's embedding (`register_init: image_token`)."""
    task, data, model, t = parts["task"], parts["data"], parts["model"], parts["trainer"]
    files = vlm_tokenizer(task, data, t.init_from, run_dir, model.vocab_size)
    tok = from_files(files)
    if len(tok) > model.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but model.decoder.vocab_size={model.vocab_size}")
    init = None
    if t.init_from is None and (task.image_tower or task.decoder or model.victor.register_init == "image_token"):
        init = str(assemble_vlm(model, task, files, Path(run_dir) / "init", t.seed))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Prepared({"train": vqa.training_dataset(data, files, counter)}, files, pad, model, init)


def vlm_tokenizer(task: VLMTaskConfig, data: vqa.VQADataConfig, init_from: str | None, run_dir: str,
                  vocab_size: int) -> TokenizerFiles:
    """`task.tokenizer`, else the decoder checkpoint's, else the checkpoint the run starts from, else the run's own,
    else a BPE trained now on the training questions and answers (saved in the run)."""
    from raytrain.checkpoint.hf import resolve_checkpoint
    from raytrain.train.trainer import read_run_files, write_run_files

    for given in (task.tokenizer, task.decoder, init_from):
        if given:
            directory = Path(given) if given == task.tokenizer else resolve_checkpoint(given)
            return to_files(load_tokenizer(directory))
    if files := read_run_files(run_dir, "tokenizer"):
        return files
    log.info("training a %d-token byte-level BPE on the VQA questions and answers", vocab_size)
    files = to_files(train_bpe(vqa.tokenizer_texts(data, task.tokenizer_texts), vocab_size))
    write_run_files(run_dir, "tokenizer", files)
    return files


def assemble_vlm(cfg: VLMConfig, task: VLMTaskConfig, files: TokenizerFiles, out: Path, seed: int) -> Path:
    """A VLM checkpoint: the tower's trunk from `task.image_tower`, the decoder from `task.decoder`, the projector
    freshly initialised, the registers too or, with `register_init: image_token`, set from the (loaded) decoder's
    embedding of `register_init_word`. Reused when `out` already holds one assembled from the same parts."""
    from raytrain.checkpoint.hf import model_state, save_pretrained
    from raytrain.models.vlm import build_vlm

    sources = {"image_tower": task.image_tower, "decoder": task.decoder}
    if cfg.victor.register_init == "image_token":
        sources["register_init_word"] = cfg.victor.register_init_word
    if (out / "raytrain.json").is_file():
        if json.loads((out / "raytrain.json").read_text()).get("assembled_from") != sources:
            raise ConfigError(f"{out} holds a VLM assembled from other parts; use a new trainer.run_name")
        return out
    torch.manual_seed(seed)
    model = build_vlm(cfg)
    if task.image_tower:
        _load_part(model.image, tower_state(task.image_tower), "task.image_tower", task.image_tower)
    if task.decoder:
        _load_part(model.decoder, decoder_state(task.decoder, cfg), "task.decoder", task.decoder)
    if cfg.victor.register_init == "image_token" and model.registers is not None:
        init_registers_from_word(model, files)
    log.info("assembled the starting VLM from %s in %s", sources, out)
    return save_pretrained(out, cfg, model_state(model), files, {"assembled_from": sources})


def init_registers_from_word(model: Any, files: TokenizerFiles) -> None:
    """`register_init: image_token`: every register row becomes the decoder's embedding of `register_init_word`
    (the mean over its tokens when the tokenizer splits it)."""
    word = model.cfg.victor.register_init_word
    token_ids = from_files(files).encode(word, add_special_tokens=False)
    if not token_ids:
        raise ConfigError(f"model.victor.register_init_word={word!r} gives no tokens; name a word of the vocabulary")
    log.info("registers start as the embedding of %r (token ids %s)", word, token_ids)
    model.init_registers_from_tokens(token_ids)


def tower_state(path: str) -> dict[str, Any]:
    """The image trunk of a ViT (CatLIP: its classifier dropped), CLIP or VLM checkpoint, by ViT parameter name."""
    from raytrain.checkpoint.hf import read_model_config, read_weights, resolve_checkpoint
    from raytrain.models.clip import ClipConfig

    found = read_model_config(path)
    state = read_weights(resolve_checkpoint(path))
    if isinstance(found, ViTConfig):
        return {k: v for k, v in state.items() if not k.startswith("head.")}
    if isinstance(found, (ClipConfig, VLMConfig)):
        return {k.removeprefix("image."): v for k, v in state.items() if k.startswith("image.")}
    raise ConfigError(f"task.image_tower={path} holds model {found.name}, which has no ViT image tower")


def decoder_state(path: str, cfg: VLMConfig) -> dict[str, Any]:
    """A decoder checkpoint's weights, after checking its config is `model.decoder`'s (RoPE base and norms too,
    which shapes alone would not catch)."""
    from raytrain.checkpoint.hf import load_pretrained, read_model_config

    found = read_model_config(path)
    if not isinstance(found, DecoderConfig):
        raise ConfigError(f"task.decoder={path} holds model {found.name}, which is not a decoder-family model")
    differ = [f.name for f in dataclasses.fields(cfg.decoder) if f.name != "name"
              and getattr(found, f.name, None) != getattr(cfg.decoder, f.name)]
    if differ:
        key = differ[0]
        raise ConfigError(f"task.decoder={path}: its {key} is {getattr(found, key, None)!r}, model.decoder.{key} is "
                          f"{getattr(cfg.decoder, key)!r}; pick a model preset of that decoder")
    return load_pretrained(path).model.state_dict()


def _load_part(module: Any, state: dict[str, Any], key: str, path: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ConfigError(f"{key}={path} does not fit this model: {first}") from None


# ---- worker side -----------------------------------------------------------------------------------------------

class Worker:
    """Per-rank behaviour of a task; see the module docstring. Subclasses set `metrics` (names of the logged loss
    parts, the total first) and implement `inputs` and `loss`. The loop keeps `step` at the optimizer steps done."""

    metrics: tuple[str, ...] = ("loss",)
    unit = "images"
    dtypes: Any = None  # dtype that `iter_torch_batches` converts columns to (None: as stored)

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.job, self.model, self.dtype, self.device = job, model, dtype, device
        self.step = 0

    def regroup(self, batches: Iterator[dict[str, torch.Tensor]], epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The stream of dataset batches as the task trains on them: unchanged, or with
        `data.variable_resolution` re-cut into batches of a random side and a size that keeps the pixels per batch
        (the same sequence on every rank: seeded by the epoch)."""
        data = self.job.data
        if not getattr(data, "variable_resolution", False):
            return batches
        shapes = batch_shapes(data.image_size, self.job.trainer.micro_batch_size, data.min_side, data.max_side,
                              data.num_scales, data.side_divisor)
        return variable_batches(batches, shapes, seed=data.shuffle_seed + epoch)

    def logits_and_augment_loss(self, engine: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and RangeAugment's loss when the model learns augmentation ranges (None otherwise)."""
        if getattr(self.model, "augment", None) is None:
            return engine(images), None
        logits, augmented = engine(images, return_augmented=True)
        total = self.job.schedule.total_steps or self.job.trainer.max_steps
        return logits, range_augment_loss(images, augmented, target_mse(self.step, total))

    def inputs(self, batch: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, the detached logged parts (len(metrics),))"""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called once per optimizer step."""

    frozen_base = False  # the model's frozen parameters stay out of the DeepSpeed checkpoints

    def export_state(self) -> dict[str, torch.Tensor] | None:
        """Weights for `model/` (None: the model's own)."""
        return None

    def write_export(self, directory: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write `model/` (rank 0): a checkpoint that `load_pretrained` reads."""
        from raytrain.checkpoint.hf import save_pretrained

        save_pretrained(directory, self.job.model, state, self.job.tokenizer_files, meta)

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


class LoRAWorker(LMWorker):
    """LMWorker on LoRA adapters: the loop loaded the base (trainer.init_from); this freezes it, adds the adapters
    (from `adapter_init`, or new) and exports only them, with the base's fingerprint."""

    frozen_base = True

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        from raytrain.checkpoint.adapter import read_adapter
        from raytrain.models.lora import apply_lora, load_adapter_state

        super().__init__(job, model, dtype, device)
        apply_lora(model, job.task.lora)
        if job.task.adapter_init:
            load_adapter_state(model, read_adapter(job.task.adapter_init).state, job.task.lora.scale)

    def export_state(self) -> dict[str, torch.Tensor] | None:
        from raytrain.models.lora import adapter_state

        return adapter_state(self.model)

    def write_export(self, directory: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from raytrain.checkpoint.adapter import save_adapter

        task = self.job.task
        save_adapter(directory, state, task.lora, task.base, task.base_fingerprint, meta)

    def flops_per_unit(self) -> float | None:
        return None  # the frozen base has no weight gradients: the dense formula would overstate the work


class CatlipWorker(Worker):
    """BCE over the synsets (plus RangeAugment's loss, when the model learns augmentation ranges); the export holds
    the EMA weights."""

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        from raytrain.train.ema import EMA

        super().__init__(job, model, dtype, device)
        if job.task.ema_momentum and job.trainer.zero_stage == 3:
            raise ConfigError("task.ema_momentum needs whole weights on every rank: use trainer.zero_stage <= 2")
        self.ema = EMA(model, job.task.ema_momentum) if job.task.ema_momentum else None
        augment = getattr(model, "augment", None) is not None
        self.metrics = ("loss", "labels_per_image", *(("range_augment",) if augment else ()))

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels(batch["image"]), batch["targets"]

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = inputs
        logits, augment_loss = self.logits_and_augment_loss(engine, images)
        loss = multilabel_bce(logits, targets)
        parts = [targets.float().sum(1).mean()]
        if augment_loss is not None:
            loss = loss + augment_loss
            parts.append(augment_loss.detach())
        return loss, torch.stack([loss.detach(), *parts])

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
                                      task.transfer_init, task.transfer_bias)
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
            logits, augment_loss = engine(images), None
        else:  # the fine-tune recipe: RangeAugment too, when the model has it
            logits, augment_loss = self.logits_and_augment_loss(engine, images)
        loss = label_smoothed_ce(logits, labels, self.job.task.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        if augment_loss is not None:
            loss = loss + augment_loss
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
        from raytrain.models.lora import apply_lora, lora_parameters

        super().__init__(job, model, dtype, device)
        task = job.task
        _load_base(model, task.init)
        apply_lora(model, task.lora)  # freezes the model; the stream parameters train besides
        lora = lora_parameters(model)
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



class VLMWorker(Worker):
    """Next-token cross-entropy on the answers of VQA rows; the parts in `task.freeze` get no gradient (Stage 1:
    tower and decoder frozen, so only the projector and the registers learn; Stage 2: the tower alone)."""

    def __init__(self, job: Any, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(job, model, dtype, device)
        set_trainable(model, job.task.freeze)

    def inputs(self, batch: dict[str, torch.Tensor]) -> VLMBatch:
        tokens = batch["tokens"]
        text_mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < batch["length"][:, None]
        return VLMBatch(tokens, text_mask, batch["image_at"], images=self.pixels(batch["image"]),
                        labels=batch["labels"])

    def loss(self, engine: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if "image" in self.job.task.freeze:
            self.model.image.eval()  # a frozen tower keeps its BatchNorm statistics
        loss = engine(inputs).loss
        return loss, loss.detach()[None]

    def flops_per_unit(self) -> float | None:
        return None


def set_trainable(model: torch.nn.Module, frozen: list[str]) -> None:
    """Only parameters outside the `frozen` parts (image, projector, registers, decoder) require gradients."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] not in frozen)


WORKERS = {LMTaskConfig: LMWorker, LoRATaskConfig: LoRAWorker, CatlipTaskConfig: CatlipWorker,
           ClipTaskConfig: ClipWorker, ClassifyTaskConfig: ClassifyWorker, VLMTaskConfig: VLMWorker,
           SpecStreamTaskConfig: SpecStreamWorker}


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
                  rows: list[int | None], bias: str = "mean") -> None:
    """Head rows of mapped classes from the source classifier; biases per `bias` (see `ClassifyTaskConfig`).
    Unmapped rows keep their random weights."""
    mapped = [(i, row) for i, row in enumerate(rows) if row is not None]
    for i, row in mapped:
        head.weight[i].copy_(source_weight[row])
    if bias == "none" or not mapped:
        head.bias.zero_()
        return
    copied = source_bias[[row for _, row in mapped]].to(head.bias.dtype)
    head.bias.fill_(copied.mean() if bias == "mean" else 0.0)
    head.bias[[i for i, _ in mapped]] = copied


def init_from_backbone(model: torch.nn.Module, backbone: str, classes: list[str], use_transfer_init: bool,
                       bias: str = "mean") -> list[int | None]:
    """Load a CatLIP checkpoint's trunk into `model` and, with Transfer Init, the classifier rows of the classes'
    synsets; returns the source row of each class."""
    from raytrain.checkpoint.hf import read_weights, resolve_checkpoint

    path = resolve_checkpoint(backbone)
    state = {k: v for k, v in read_weights(path).items() if not k.startswith("augment.")}  # ranges: pretraining's
    head_w, head_b = state.pop("head.weight", None), state.pop("head.bias", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or {m for m in missing if not m.startswith("augment.")} - {"head.weight", "head.bias"}:
        raise ConfigError(f"task.backbone={backbone}: not a ViT trunk of this model's shape "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    rows: list[int | None] = [None] * len(classes)
    if use_transfer_init and head_w is not None and (path / VOCAB_FILE).is_file():
        vocab = synsets.Vocabulary.load(path / VOCAB_FILE)
        rows = transfer_rows(classes, vocab.ids)
        transfer_init(model.head, head_w, head_b, rows, bias)
    elif use_transfer_init:
        log.warning("task.backbone=%s has no classifier or no %s; the head starts random", backbone, VOCAB_FILE)
    return rows

