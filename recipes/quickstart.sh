#!/usr/bin/env bash
# Install everything into .venv and run the main job end to end on Multi30k English-German:
# a short version of recipes/multi30k/run.sh (a 4-minute Transformer with small batches and a short
# warm-up, about 16 BLEU on test2016 on a 2-core CPU) that ends with its test BLEU
# and the command to translate with it. Arguments go to run.sh (e.g. --minutes 60 --models "transformer lstm").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/recipes/install.sh"
venv=${NMT_VENV:-$root/.venv}
export NMT_TRAIN_ARGS=${NMT_TRAIN_ARGS:---set train.max_tokens=1024 --set train.warmup=150 --set train.lr=0.002 --set train.valid_max_sentences=200}
PATH="$venv/bin:$PATH" exec bash "$root/recipes/multi30k/run.sh" --work "$root/work/quickstart" --minutes 4 --models transformer "$@"
