"""benchmarks/seedlm_fused_gemv.py's choice of what to time: a model's four fused-step projections per layer, with
the variants `raytrain/infer/fused_decode.py` runs them with (the timing itself needs a GPU)."""

from __future__ import annotations

import importlib.util

import pytest

from omegaconf import OmegaConf

from raytrain.compress.kernels.seedlm_matmul import KernelConfig
from raytrain.models.registry import build_model, model_config
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("seedlm_fused_gemv", REPO / "benchmarks" / "seedlm_fused_gemv.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_projections_are_the_fused_steps_with_their_variants() -> None:
    model = build_model(model_config(OmegaConf.load(REPO / "conf" / "model" / "openelm_tiny.yaml")), "meta")
    chosen = bench.projections("openelm_tiny", [0, len(model.layers) - 1])
    assert [(p["layer"], p["kind"]) for p in chosen][:4] == [(0, "qkv_norm"), (0, "out_residual"),
                                                            (0, "gate_up_norm_swiglu"), (0, "down_residual")]
    last = model.layers[-1]
    by_kind = {p["kind"]: p for p in chosen if p["layer"] == len(model.layers) - 1}
    assert (by_kind["qkv_norm"]["rows"], by_kind["qkv_norm"]["cols"]) == (last.attn.qkv_proj.out_features,
                                                                          last.attn.qkv_proj.in_features)
    assert by_kind["gate_up_norm_swiglu"]["rows"] == 2 * by_kind["down_residual"]["cols"]  # gate and up halves
    flags = {k: (p["norm"], p["swiglu"], p["residual"]) for k, p in by_kind.items()}
    assert flags == {"qkv_norm": (True, False, False), "out_residual": (False, False, True),
                     "gate_up_norm_swiglu": (True, True, False), "down_residual": (False, False, True)}


def test_totals_sum_each_kind_over_layers() -> None:
    results = [{"kind": "a", "t": 1.0}, {"kind": "b", "t": 2.0}, {"kind": "a", "t": 3.0}]
    assert bench.totals(results, "t") == {"a": 4.0, "b": 2.0}


def test_a_layer_the_model_lacks_is_named() -> None:
    with pytest.raises(ValueError, match=r"--layers \[9\]: openelm_tiny has layers 0\.\."):
        bench.projections("openelm_tiny", [0, 9])


def test_all_layers_are_every_layer_in_order() -> None:
    model = build_model(model_config(OmegaConf.load(REPO / "conf" / "model" / "openelm_tiny.yaml")), "meta")
    layers = [p["layer"] for p in bench.projections("openelm_tiny", None)]
    assert layers == [i for i in range(len(model.layers)) for _ in range(4)]


def test_tiles_parse_and_a_malformed_one_is_named() -> None:
    assert bench.parse_tiles("m8w4, m4w2r64") == [(8, 4, None), (4, 2, 64)]
    assert bench.parse_tiles("") == []
    assert [bench.tile_name(c) for c in (KernelConfig(4, 128, 4), KernelConfig(8, 256, 8, max_registers=96))] == [
        "m4w4", "m8w8r96"]
    for bad in ("m8", "m4w4r"):
        with pytest.raises(ValueError, match=rf"--tiles '{bad}': expected mROWSwWARPS"):
            bench.parse_tiles(f"m4w4,{bad}")
