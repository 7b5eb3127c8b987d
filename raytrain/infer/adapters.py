"""Many LoRA adapters on one base for serving (plain PyTorch): adapters load into slots on first use, LRU-bounded.

`AdapterSlots` puts a LoRA bank of `slots` adapters on every targeted projection of the base (`apply_lora`), all
empty; `ids(names)` turns the adapter name of each batch row (None: the base alone) into slot ids, loading an
adapter the first time it is asked for (its directory from `resolve`, checked against the base's fingerprint) and
evicting the least recently used adapter that the batch does not need. The forward then runs under
`selection.rows(ids)`, so one batch mixes adapters row by row. A batch that needs more distinct adapters than there
are slots is refused (`TooManyAdapters`): the engine splits it into groups. The bank's rank is the largest an
adapter may have; smaller ranks are exact (their extra columns stay zero).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from raytrain.checkpoint.adapter import AdapterError, check_base, read_adapter
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
        self.selection = apply_lora(model, bank, slots)
        for layer in lora_layers(model).values():
            layer.scale.zero_()  # every slot starts empty
        self.slots = slots
        self.loaded: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recently used first
        self.loads = 0

    def ids(self, names: Sequence[str | None]) -> torch.Tensor:
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
        device = next(iter(lora_layers(self.model).values())).scale.device
        return torch.tensor([self.loaded[n] if n is not None else -1 for n in names], device=device)

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
