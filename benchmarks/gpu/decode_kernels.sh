#!/usr/bin/env bash
# The decode kernels built on 2026-12-05 without a GPU, timed on one (docs/engine.md: "Split-KV decode attention";
# docs/seedlm_kernel.md: "SeedLM inside the fused decode step"). Four commands, about 7 minutes on an H100/H200,
# each writing one JSON line (ncu: a CSV) to OUT (its table and per-point lines to a .log beside it):
#
#   bash benchmarks/gpu/decode_kernels.sh [OUT]
#
# 1. decode_attention.py: split-KV against the single-program kernel per shape and context, chunk sizes swept (which
#    SPLIT_KEYS to keep);
# 2. decode.py at 3,900-token prompts (TinyLlama's shape, 4 KV heads, a 4,096-token window here): batch-1 decode end
#    to end, where split-KV should show;
# 3. seedlm_kernel.py on 4096x4096 with the engine: SeedLM 4-bit openelm_1_1b against bf16, both through the fused
#    decode step, SeedLM with each weight's default stream and with the LFSR stream everywhere;
# 4. Nsight Compute on SeedLM's kernels at 4096x14336 (seedlm_launch.py, default tiles): batch 1 with the LFSR and
#    byte-table streams, batch 8 with the byte tables; issue, pipe utilisation, stall reasons, occupancy and L1
#    traffic (raw page, one CSV row per kernel), to hold against seedlm_sass.py's static model
#    (docs/seedlm_kernel.md: "Issue is not the only limit"). A machine where ncu cannot read the counters leaves its
#    error in the .log and the other results stand.
# Random weights throughout; nothing is downloaded.
set -euo pipefail
out=${1:-outputs/decode_kernels}
day=$(date +%F)
gpu=$(python -c 'import re, torch; m = re.search(r"[A-Z]\d{3}", torch.cuda.get_device_name())
print(m[0].lower() if m else "gpu")')  # h100, h200: in the file names
mkdir -p "$out"
python benchmarks/decode_attention.py --device cuda > "$out/decode_attention_${gpu}_$day.jsonl" \
  2> "$out/decode_attention_${gpu}_$day.log"
python benchmarks/decode.py --device cuda --no-hf --models tinyllama_1_1b --batches 1 --prompt 3900 --new 128 \
  > "$out/decode_prompt3900_${gpu}_$day.jsonl" 2> "$out/decode_prompt3900_${gpu}_$day.log"
python benchmarks/seedlm_kernel.py --device cuda --shapes 4096x4096 --batches 1 --streams lfsr,bytes \
  --search-blocks 65536 --engine-streams auto,lfsr > "$out/seedlm_kernel_engine_${gpu}_$day.jsonl" \
  2> "$out/seedlm_kernel_engine_${gpu}_$day.log"
for spec in "lfsr 1 _gemv_kernel" "bytes 1 _gemv_kernel" "bytes 8 _dot_kernel"; do
  set -- $spec
  ncu --kernel-name regex:$3 --launch-skip 2 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section InstructionStats --section WarpStateStats --section Occupancy --section LaunchStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --csv --page raw \
    python benchmarks/seedlm_launch.py --device cuda --stream "$1" --batch "$2" \
    > "$out/seedlm_ncu_raw_${1}_b${2}_${gpu}_$day.csv" 2> "$out/seedlm_ncu_raw_${1}_b${2}_${gpu}_$day.log" \
    || echo "ncu failed for $spec: see $out/seedlm_ncu_raw_${1}_b${2}_${gpu}_$day.log" >&2
done
tail -n 3 "$out"/*_"$day".log
