"""Checkpoint averaging: OpenELM releases the mean of its last five checkpoints (5k steps apart) rather than the
last one (spec section 3); `average` does the same for any run's registered checkpoints."""

from __future__ import annotations

import json
from pathlib import Path


from raytrain.checkpoint.hf import CONFIG, META, CheckpointError, load_pretrained, model_state, save_pretrained
from raytrain.data.tokenizer import to_files


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint exports (`step*/model`), oldest first, up to the latest registered one."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        raise CheckpointError(f"{run_dir} is not a training run directory (no checkpoint_manager_snapshot.json)")
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    steps = sorted(p for p in run_dir.glob("step*") if (p / "model" / CONFIG).is_file() and latest and p.name <= latest)
    return [p / "model" for p in steps]


def average(run_dir: str | Path, k: int, out: str | Path, every: int | None = None) -> Path:
    """Write the element-wise mean of the last `k` checkpoints (those at multiples of `every` steps, if given)."""
    chosen = run_checkpoints(Path(run_dir))
    if every:
        chosen = [p for p in chosen if json.loads((p / META).read_text())["step"] % every == 0]
    if len(chosen) < k:
        raise CheckpointError(f"{run_dir} has {len(chosen)} eligible checkpoints; k={k} needs more "
                              "(raise trainer.keep_checkpoints when training)")
    chosen = chosen[-k:]
    first = load_pretrained(chosen[0])
    total = {name: p.detach().double() for name, p in model_state(first.model).items()}
    for path in chosen[1:]:
        model = load_pretrained(path).model
        if model.cfg != first.config:
            raise CheckpointError(f"{path} holds another model than {chosen[0]}")
        for name, p in model_state(model).items():
            total[name] += p.detach().double()
    dtype = next(iter(model_state(first.model).values())).dtype
    mean = {name: (t / k).to(dtype) for name, t in total.items()}
    steps = [json.loads((p / META).read_text())["step"] for p in chosen]
    meta = {**first.meta, "step": steps[-1], "averaged_steps": steps}
    files = to_files(first.tokenizer) if first.tokenizer is not None else None
    return save_pretrained(out, first.config, mean, files, meta)
