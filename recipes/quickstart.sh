#!/usr/bin/env bash
# Install everything into .venv and run the main job end to end on Multi30k English-German:
# a short version of recipes/multi30k/run.sh: a 4-minute Transformer with nothing chosen by hand (the
# vocabulary, model size, regularisation and schedule are sized to the corpus and the budget), that ends
# with its test BLEU and the command to translate with it. Arguments go to run.sh (e.g. --minutes 60 --models "transformer lstm").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/recipes/install.sh"
venv=${NMT_VENV:-$root/.venv}
# Validation and the final choice on 200 sentences each, to keep a 4-minute run's overhead small.
export NMT_TRAIN_ARGS=${NMT_TRAIN_ARGS:---set train.valid_max_sentences=200 --set train.select_max_sentences=200}
PATH="$venv/bin:$PATH" exec bash "$root/recipes/multi30k/run.sh" --work "$root/work/quickstart" --minutes 4 --models auto \
  --vocab auto "$@"
