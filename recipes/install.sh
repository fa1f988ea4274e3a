#!/usr/bin/env bash
# Install nmt and its dependencies into a local virtual environment (.venv by default).
#
# CPU machines get the CPU build of torch; a CUDA machine sets TORCH_INDEX_URL to a
# CUDA wheel index (see README). Re-running is cheap: nothing is reinstalled unless
# pyproject.toml changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NMT_VENV:-$root/.venv}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
extras=${NMT_EXTRAS:-dev}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install "torch==$torch_version" --index-url "$TORCH_INDEX_URL"
  else
    "${pip[@]}" install "torch==$torch_version"
  fi
fi

stamp="$venv/.nmt-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "${pip[@]}" install -e "$root[$extras]"
  echo "$want" > "$stamp"
fi
echo "nmt installed in $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
