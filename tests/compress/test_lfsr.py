"""The LFSR against the verification facts of the spec (§2.1, §5): period, emitted states, cycle offsets, U(s)."""

from __future__ import annotations

import pytest
import torch

from raytrain.compress.lfsr import (LFSRConfig, cycle, emit, matrices, offset_of_state, state_of_offset, step,
                                    window_states)

K16 = LFSRConfig()


def test_k16_is_maximal_length_with_the_spec_states() -> None:
    table = cycle(K16)
    assert table.numel() == 65535 and torch.equal(table.sort().values, torch.arange(1, 65536))
    assert table[:8].tolist() == [32768, 16384, 8192, 4096, 34816, 17408, 8704, 4352]
    assert table[65533] == 3 and table[65534] == 1
    assert list(emit(1, 8, K16)) == table[:8].tolist()  # the vectorised cycle agrees with the reference step


def test_period_by_stepping_from_seed_1() -> None:
    x, n = step(1, K16), 1
    while x != 1:
        x, n = step(x, K16), n + 1
    assert n == 65535


@pytest.mark.parametrize("K, taps, period", [(3, (0, 1), 7), (8, (0, 2, 3, 4), 255), (12, (0, 1, 2, 8), 4095)])
def test_every_tap_set_of_the_table_is_maximal(K: int, taps: tuple[int, ...], period: int) -> None:
    table = cycle(LFSRConfig(K, taps))
    assert table.numel() == period and table.unique().numel() == period


def test_non_maximal_taps_are_refused() -> None:
    with pytest.raises(ValueError, match="not maximal-length"):
        cycle(LFSRConfig(16, (0, 1)))


def test_seed_and_cycle_offset_conventions() -> None:
    inverse = offset_of_state(K16)
    assert inverse[1] == 0 and inverse[32768] == 1 and inverse[0xACE1] == 57935
    assert state_of_offset(torch.tensor([0, 1, 57935]), K16).tolist() == [1, 32768, 0xACE1]
    seeds = torch.randint(1, 65536, (50,))
    assert torch.equal(state_of_offset(inverse[seeds], K16), seeds)
    # seed 0xACE1 emits exactly the window at its offset
    window = window_states(inverse[torch.tensor([0xACE1])], 8, 3, K16).flatten().tolist()
    assert window == list(emit(0xACE1, 24, K16))


def test_k3_worked_example() -> None:
    k3 = LFSRConfig(3, (0, 1))
    assert list(emit(4, 8, k3)) == [2, 5, 6, 7, 3, 1, 4, 2]
    offset = offset_of_state(k3)[torch.tensor([4])]
    assert window_states(offset, 4, 2, k3)[0].tolist() == [[2, 5], [6, 7], [3, 1], [4, 2]]
    expected = torch.tensor([[-2, 1], [2, 3], [-1, -3], [0, -2]], dtype=torch.float64) / 3
    torch.testing.assert_close(matrices(offset, 4, 2, k3)[0], expected)


def test_v1_and_u_statistics_for_8x3() -> None:
    V1 = window_states(torch.tensor([0]), 8, 3, K16)[0]
    assert V1.tolist() == [[32768, 16384, 8192], [4096, 34816, 17408], [8704, 4352, 34944], [17472, 8736, 4368],
                           [34952, 50244, 25122], [45329, 22664, 11332], [5666, 2833, 34184],
                           [49860, 24930, 45233]]
    U = matrices(torch.arange(65535), 1, 1, K16)
    assert U.min() == -1 and U.max() == 1 and abs(float(U.sum())) < 1e-9
    assert float(U.square().mean()) == pytest.approx(0.333344, abs=1e-6)


def test_sliding_window_identity() -> None:
    U = matrices(torch.tensor([100, 101]), 8, 3, K16)
    torch.testing.assert_close(U[1][:, :2], U[0][:, 1:])
    torch.testing.assert_close(U[1][:-1, 2], U[0][1:, 0])
