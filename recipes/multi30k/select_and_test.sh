#!/usr/bin/env bash
# Choose the checkpoint (best.pt or the average of the last 5) and the length penalty alpha on the
# validation set only, then translate and score test2016 once with that choice.
# Usage: recipes/multi30k/select_and_test.sh RUN_DIR WORK_DIR
#   RUN_DIR   an `nmt train` run directory
#   WORK_DIR  holds valid.src/valid.ref and test.src/test.ref (written by run.sh)
# Writes RUN_DIR/selection.json (every valid score, and "chosen": {"checkpoint": "best" or "averaged",
# "alpha": A}) and RUN_DIR/test.{hyp,json,moses.json}.
set -euo pipefail
run=${1:?usage: select_and_test.sh RUN_DIR WORK_DIR}
work=${2:?usage: select_and_test.sh RUN_DIR WORK_DIR}
alphas=${NMT_ALPHAS:-"0.6 1.0 1.4 2.0"}
sweep=$run/sweep
mkdir -p "$sweep"

nmt average "$run" --last 5 -o "$run/averaged.pt"
for ckpt in best averaged; do
  for alpha in $alphas; do
    nmt eval -m "$run/$ckpt.pt" --src "$work/valid.src" --ref "$work/valid.ref" --beam 5 --alpha "$alpha" \
      --metrics bleu --hyp-out "$sweep/valid.$ckpt.$alpha.hyp" --json > "$sweep/valid.$ckpt.$alpha.json"
  done
done

choice=$(python - "$run" "$alphas" <<'PY'
import json, sys
from pathlib import Path
run, alphas = Path(sys.argv[1]), sys.argv[2].split()
scores = {
    f"{ckpt} alpha={alpha}": json.loads((run / "sweep" / f"valid.{ckpt}.{alpha}.json").read_text())["scores"]["bleu"]["score"]
    for ckpt in ("best", "averaged") for alpha in alphas
}
best = max(scores, key=scores.get)
ckpt, alpha = best.split(" alpha=")
chosen = {"checkpoint": ckpt, "alpha": float(alpha)}
(run / "selection.json").write_text(json.dumps({"valid_bleu": scores, "chosen": chosen}, indent=1) + "\n")
for name, score in scores.items():
    print(f"   valid BLEU {score:6.2f}  {name}{'   <- chosen' if name == best else ''}", file=sys.stderr)
print(ckpt, alpha)
PY
)
read -r ckpt alpha <<< "$choice"

nmt translate -m "$run/$ckpt.pt" -i "$work/test.src" -o "$run/test.hyp" --beam 5 --alpha "$alpha"
nmt eval --hyp "$run/test.hyp" --ref "$work/test.ref" --metrics bleu,chrf --json > "$run/test.json"
# As the Multi30k papers: Moses-tokenised, lowercased BLEU (multi-bleu.perl style).
nmt eval --hyp "$run/test.hyp" --ref "$work/test.ref" --moses de --lowercase --json > "$run/test.moses.json"
python - "$run" "$ckpt" "$alpha" <<'PY'
import json, sys
run, ckpt, alpha = sys.argv[1:]
scores = list(json.load(open(f"{run}/test.json"))["scores"].values())
moses = json.load(open(f"{run}/test.moses.json"))["scores"]["bleu"]
print(f"   {run}/{ckpt}.pt, beam 5, alpha {alpha}  test2016: "
      + "  ".join(f"{s['name']} {s['score']:.2f}" for s in scores)
      + f"  (Moses-tokenised lowercased BLEU {moses['score']:.2f})")
for s in [*scores, moses]:
    print(f"      {s['name']}|{s['signature']}")
PY
