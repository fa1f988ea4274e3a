#!/usr/bin/env bash
# Multi30k English->German end to end.
# Usage: recipes/multi30k/run.sh [DATA_DIR] [WORK_DIR]
#   DATA_DIR holds train/valid/test2016 .en/.de (default: ../shared/data/multi30k-en-de beside the repo)
#   WORK_DIR receives every artefact (default: work/multi30k in the repo; git ignores it)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
data=${1:-$root/../shared/data/multi30k-en-de}
work=${2:-$root/work/multi30k}
[ -f "$data/train.en" ] || { echo "error: $data/train.en not found; pass the data folder as the first argument" >&2; exit 1; }
mkdir -p "$work"

echo "== 1. tokenizer: joint SentencePiece BPE over English and German"
nmt tokenizer "$data/train.en" "$data/train.de" --prefix "$work/spm" --vocab-size 8000
