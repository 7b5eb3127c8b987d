"""Many LoRA adapters on one base for serving (plain PyTorch): adapters load into slots on first use, LRU-bounded.

`AdapterSlots` puts a LoRA bank of `slots` adapters, in the model's dtype, on every targeted projection of the base
(`apply_lora`), all empty; `slots_of(names)` turns the adapter name of each batch row (None: the base alone) into
slot ids, loading an adapter the first time it is asked for (its directory from `resolve`, checked against the
base's fingerprint) and evicting the least recently used adapter that the batch does not need. The forward then runs
under `selection.rows(ids)` (those ids on the device), so one batch mixes adapters row by row. A batch that needs
more distinct adapters than there are slots is refused (`TooManyAdapters`): the engine admits a sequence only when
its adapter `fits` beside those of the running ones. The bank's rank is the largest an adapter may have; smaller
ranks are exact (their extra columns stay zero). `from_dirs` builds the slots of a server from a name -> directory
map, every adapter checked up front (`adapter_bank`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from torch import nn

from raytrain.checkpoint.adapter import AdapterError, base_fingerprint, check_base, read_adapter
from raytrain.models.lora import LoRAConfig, apply_lora, load_adapter_state, lora_layers


class TooManyAdapters(AdapterError):
    pass


class AdapterSlots:
    def __init__(self, model: nn.Module, base_path: str | Path, fingerprint: str, slots: int, bank: LoRAConfig,
                 resolve: Callable[[str], Path]) -> None:
        """`bank`: the targets and splits every adapter must have, and the largest rank; `resolve`: adapter name ->
        its directory."""
        self.model, self.base_path, self.fingerprint, self.bank, self.resolve = model, base_path, fingerprint, bank, \
            resolve
        # the bank in the model's dtype: a float32 bank would be cast whole in every forward of a bf16 model
        self.selection = apply_lora(model, bank, slots, dtype=next(model.parameters()).dtype)
        for layer in lora_layers(model).values():
            layer.scale.zero_()  # every slot starts empty
        self.slots = slots
        self.names: set[str] | None = None  # the adapters this server may load (None: any `resolve` finds)
        self.loaded: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recently used first
        self.loads = 0

    @classmethod
    def from_dirs(cls, model: nn.Module, base_path: str | Path, dirs: Mapping[str, str | Path], slots: int,
                  key: str = "adapters") -> AdapterSlots:
        """Slots for the adapters `dirs` (name -> directory), all checked now (`adapter_bank`)."""
        if slots < 1:
            raise AdapterError(f"{key}: {slots} adapter slots; need at least 1")
        bank = adapter_bank(base_path, dirs, key)
        server = cls(model, base_path, base_fingerprint(base_path), slots, bank, lambda name: Path(dirs[name]))
        server.names = set(dirs)
        return server

    def serves(self, name: str) -> bool:
        return self.names is None or name in self.names

    def fits(self, name: str | None, active: Iterable[str | None]) -> bool:
        """Whether a sequence with adapter `name` can run beside sequences using the adapters `active`."""
        held = {a for a in active if a is not None}
        return name is None or name in held or len(held) < self.slots

    def slots_of(self, names: Sequence[str | None]) -> list[int]:
        """Slot of each row's adapter (-1 for None), loading and evicting as needed."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        if len(wanted) > self.slots:
            raise TooManyAdapters(f"the batch asks for {len(wanted)} adapters; this replica holds {self.slots} at "
                                  "once: split the batch by adapter")
        for name in wanted:
            if name in self.loaded:
                self.loaded.move_to_end(name)
            else:
                self._load(name, keep=set(wanted))
        return [self.loaded[n] if n is not None else -1 for n in names]

    def _load(self, name: str, keep: set[str]) -> None:
        adapter = read_adapter(self.resolve(name))
        check_base(adapter, self.fingerprint, self.base_path)
        shape = (adapter.lora.targets, adapter.lora.split_qkv, adapter.lora.split_gate_up)
        if shape != (self.bank.targets, self.bank.split_qkv, self.bank.split_gate_up) or \
                adapter.lora.rank > self.bank.rank:
            raise AdapterError(f"adapter {name} ({adapter.lora}) does not fit this replica's slots (targets "
                               f"{self.bank.targets}, splits {self.bank.split_qkv}/{self.bank.split_gate_up}, rank "
                               f"<= {self.bank.rank})")
        used = set(self.loaded.values())
        free = [s for s in range(self.slots) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(n for n in self.loaded if n not in keep)
            slot = self.loaded.pop(victim)
        load_adapter_state(self.model, adapter.state, adapter.lora.scale, slot)
        self.loaded[name] = slot
        self.loads += 1


def adapter_bank(base_path: str | Path, dirs: Mapping[str, str | Path], key: str = "adapters") -> LoRAConfig:
    """The LoRA bank that takes every adapter of `dirs` (name -> directory): their shared targets and splits, their
    largest rank. Every adapter is read and checked against the base, so a missing directory, another base or
    mismatched LoRA settings fail at startup naming `key.<name>`."""
    if not dirs:
        raise AdapterError(f"{key}: no adapters")
    fingerprint, loras = base_fingerprint(base_path), {}
    for name, directory in dirs.items():
        try:
            adapter = read_adapter(directory)
            check_base(adapter, fingerprint, base_path)
        except AdapterError as e:
            raise AdapterError(f"{key}.{name}: {e}") from None
        loras[name] = adapter.lora
    shapes = {(tuple(lora.targets), lora.split_qkv, lora.split_gate_up) for lora in loras.values()}
    if len(shapes) != 1:
        raise AdapterError(f"{key}: the adapters differ in LoRA targets or q/k/v, gate/up splits "
                           f"({sorted(shapes)}); one replica's slots take one shape")
    first = next(iter(loras.values()))
    return LoRAConfig(rank=max(lora.rank for lora in loras.values()), targets=list(first.targets),
                      split_qkv=first.split_qkv, split_gate_up=first.split_gate_up)
