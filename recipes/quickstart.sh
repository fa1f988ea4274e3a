#!/usr/bin/env bash
# Install everything into .venv and run the main job end to end on Multi30k English-German.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/recipes/install.sh"
venv=${NMT_VENV:-$root/.venv}
PATH="$venv/bin:$PATH" exec bash "$root/recipes/multi30k/run.sh" "$@"
