"""adastar's fused Triton step against its foreach step. Without a GPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py before triton is first imported). fp32 only: the interpreter rounds
to bf16 wrongly."""

from __future__ import annotations

import torch

from raytrain.train.engine import contiguous_layout
from raytrain.train.optim import AdaStar
from tests.conftest import triton_device

DEVICE = triton_device("the fused step needs triton")

from raytrain.train import adastar_kernels  # noqa: E402,F401 (its kernels are decorated now, under the interpreter)

SHAPES = [(5000,), (7,), (3, 5), (64, 33)]  # 5000 elements: a full 4096-element block and a partial one



def _steps(fused: bool, params: list[torch.Tensor], grads: list[list[torch.Tensor]],
           layouts: dict | None = None) -> tuple[list[torch.Tensor], AdaStar]:
    """Three steps of two groups (update scale 0.25 with decay; 1 without) with every update clipped."""
    params = [torch.nn.Parameter(p.clone().to(DEVICE)) for p in params]
    half = len(params) // 2 or 1
    opt = AdaStar([{"params": params[:half], "update_scale": 0.25, "weight_decay": 0.1},
                   {"params": params[half:]}], lr=0.01, update_clip=0.3, eps=1e-8, skip_grad_norm=None,
                  fused=fused)
    if layouts is not None:
        opt.attach(lambda: 1.0, {params[0]: layouts})
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.to(DEVICE)
        opt.step()
    return params, opt


def test_the_fused_step_equals_the_foreach_step_on_whole_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) * 3 for s in SHAPES] for _ in range(3)]  # global clip active
    fused, fused_opt = _steps(True, start, grads)
    foreach, foreach_opt = _steps(False, start, grads)
    for a, b, before in zip(fused, foreach, start):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
        for key, rtol, atol in (("m", 0, 1e-7), ("v", 1e-5, 0)):  # m crosses 0; v is small (~1e-5 here)
            torch.testing.assert_close(fused_opt.state[a][key], foreach_opt.state[b][key], rtol=rtol, atol=atol)
        assert not torch.equal(a.detach().cpu(), before)


def test_the_fused_step_updates_the_segments_of_a_flat_partition_like_the_foreach_step() -> None:
    """Tensors of 15, 7 and 9 elements end to end at offsets 0, 16, 24 of a 34-element flat (ZeRO-2 alignment
    padding between them), one rank."""
    offsets, numels = [0, 16, 24], [15, 7, 9]
    layout = contiguous_layout(offsets, numels, 34, 0)

    def flat(seed: int) -> torch.Tensor:
        out, gen = torch.zeros(34), torch.Generator().manual_seed(seed)
        for o, n in zip(offsets, numels):
            out[o:o + n] = torch.randn(n, generator=gen)
        return out

    grads = [[flat(seed)] for seed in (1, 2, 3)]
    (fused,), _ = _steps(True, [flat(0)], grads, layout)
    (foreach,), _ = _steps(False, [flat(0)], grads, layout)
    for o, n in zip(offsets, numels):
        torch.testing.assert_close(fused.detach()[o:o + n], foreach.detach()[o:o + n], rtol=0, atol=1e-6)
