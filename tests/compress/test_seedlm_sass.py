"""benchmarks/seedlm_sass.py's pipe model (which opcodes load which Hopper pipe, and the cycles each limit needs) and
the batch-1 and batched loops it compiles (sm_90a code built on CPU), and benchmarks/seedlm_launch.py, the kernel
launches that Nsight Compute profiles on a GPU (interpreted here)."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("seedlm_sass", REPO / "benchmarks" / "seedlm_sass.py")
sass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass)


def compiled(expression: str) -> Any:
    """`expression` over benchmarks/seedlm_sass.py (as `s`), evaluated in a process without TRITON_INTERPRET, where
    Triton compiles for sm_90a instead of interpreting."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import seedlm_sass as s; "
            f"print(json.dumps({expression}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_pipe_cycles_count_half_rate_integer_pipes_twice() -> None:
    loop = collections.Counter({"LOP3.LUT": 6, "SHF.R.U64": 2, "FFMA": 8, "IMAD.SHL.U32": 1, "LDG.E.64": 1})
    # 18 instructions issued; 8 on the 16-lane alu pipe (2 cycles each); 8 FFMA over two FMA pipes plus one IMAD
    assert sass.pipe_cycles(loop, units=2) == {"issue": 9.0, "alu": 8.0, "fma": 4.5}
    imad_heavy = collections.Counter({"IMAD.MOV.U32": 5, "FADD": 1})
    assert sass.pipe_cycles(imad_heavy, units=1)["fma"] == 10  # IMAD only on fmaheavy: 2 cycles each


def test_main_loop_is_the_longest_backward_branch() -> None:
    code = """
        /*0000*/ MOV R1, c[0x0][0x28] ;
        /*0010*/ LOP3.LUT R2, R3, R4, RZ, 0xc0, !PT ;
        /*0020*/ FFMA R5, R2, R2, R5 ;
        /*0030*/ @P0 BRA 0x10 ;
        /*0040*/ EXIT ;
    """
    assert sass.main_loop(code) == collections.Counter({"LOP3.LUT": 1, "FFMA": 1, "BRA": 1})


def test_the_profiled_launches_run_and_say_what_they_launched() -> None:
    command = [sys.executable, "benchmarks/seedlm_launch.py", "--device", "cpu", "--shape", "8x1024", "--stream",
               "table", "--launches", "2"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)  # TRITON_INTERPRET inherited
    assert run.returncode == 0, run.stderr[-3000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert line["shape"] == [8, 1024] and line["stream"] == "table" and line["launches"] == 2
    assert line["tile"]["block_m"] == 4 and line["median_us"] > 0  # 8 rows: a 4-row tile


def test_the_batch_1_loop_stays_in_registers_at_an_aligned_launch() -> None:
    """Compiled for sm_90a as a launch with 16-byte aligned pointers and shapes specialises it (in a process without
    TRITON_INTERPRET): no shared memory, barrier or shuffle in the main loop of the 8-row tile with either stream
    gathering through L1 (a vectorised load of the words put a layout conversion with 16 barriers into every step)
    and no spills. With the byte tables in shared memory (`shared_tables`, the default from 8,192 rows) the loop
    reads them with LDS and still spills nothing."""
    loops = compiled("[s.gemv(n, 8, shared) for n, shared in (('lfsr', False), ('bytes', False), ('bytes', True))]")
    for loop in loops[:2]:
        assert not loop["shared_or_shuffle_in_loop"] and loop["stack_bytes"] == 0, loop
        assert loop["per_unit"] < 14, loop  # instructions a weight (12.4 with the LFSR, 10.8 with bytes)
    shared = loops[2]
    assert "LDS" in shared["shared_ops_in_loop"] and shared["stack_bytes"] == 0, shared
    assert shared["per_unit"] < 14, shared  # 10.7


def test_the_batched_default_tile_reads_the_rebuilt_tile_with_wgmma_from_registers() -> None:
    """default_config(2..16) compiled as launched: Hopper's wgmma (HGMMA) takes the rebuilt tile, where a 32-row tile
    gets mma.sync (HMMA) and moves each operand register out of shared memory (15 instructions a weight). Dealt in
    the A operand's fragment order, the tile goes to the MMA from registers: no ldmatrix reads it back from shared
    memory (only x is staged there, as wgmma's B operand must be)."""
    loop = compiled("s.dot('bytes')")
    assert loop["mma_in_loop"] == ["HGMMA"] and loop["stack_bytes"] == 0, loop
    assert loop["per_unit"] < 14, loop  # instructions a weight (13.4 on Triton 3.9, 13.0 on 3.6)
    assert not any(op.startswith("LDSM") for op in loop["shared_ops_in_loop"]), loop
