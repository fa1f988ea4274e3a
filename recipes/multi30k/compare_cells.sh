#!/usr/bin/env bash
# LSTM vs GRU vs Elman RNN at equal sizes (recipes/multi30k/lstm.toml with only the cell changed):
# parameters, training tokens/s and validation BLEU after the same wall-clock budget.
# Usage: recipes/multi30k/compare_cells.sh DATA_DIR [MINUTES] [WORK_DIR]   (DATA_DIR from nmt prepare)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
data=${1:?usage: compare_cells.sh DATA_DIR [MINUTES] [WORK_DIR]}
minutes=${2:-5}
work=${3:-$(dirname "$data")/cells}
for cell in lstm gru rnn; do
  rm -rf "$work/$cell"
  nmt train --config "$here/lstm.toml" --data "$data" --run-dir "$work/$cell" --max-minutes "$minutes" \
    --set model.cell="$cell" --set train.max_epochs=0 --set train.log_every=10 >/dev/null
done
python - "$work" <<'PY'
import json, sys
from pathlib import Path
from nmt import load_checkpoint
from nmt.models import build_model
print(f"{'cell':6} {'parameters':>12} {'tokens/s':>10} {'updates':>8} {'valid BLEU':>11}")
for cell in ("lstm", "gru", "rnn"):
    run = Path(sys.argv[1]) / cell
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"][-1]
    last = sorted(run.glob("update_*.pt"))[-1]
    params = build_model(load_checkpoint(last).config.model).num_parameters()
    tokens_per_s = sum(r["tokens_per_s"] for r in train) / len(train)
    print(f"{cell:6} {params:>12,} {tokens_per_s:>10,.0f} {valid['update']:>8} {valid['bleu']:>11.2f}")
PY
