#!/usr/bin/env bash
# Install everything into .venv and run the main job end to end on Multi30k English-German:
# a short version of recipes/multi30k/run.sh (a 3-minute Transformer) that ends with its test BLEU
# and the command to translate with it. Arguments go to run.sh (e.g. --minutes 60 --models "transformer lstm").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/recipes/install.sh"
venv=${NMT_VENV:-$root/.venv}
PATH="$venv/bin:$PATH" exec bash "$root/recipes/multi30k/run.sh" --work "$root/work/quickstart" --minutes 3 --models transformer "$@"
