#!/usr/bin/env bash
# Install everything into .venv and run the test suite.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/recipes/install.sh"
venv=${NMT_VENV:-$root/.venv}
cd "$root"
exec "$venv/bin/python" -m pytest -q "$@"
