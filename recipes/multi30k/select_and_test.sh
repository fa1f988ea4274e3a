#!/usr/bin/env bash
# Translate test2016 once with RUN_DIR/final.pt and score it. `nmt train` wrote final.pt at its end: best.pt
# or the average of the last keep_last checkpoints, and the length penalty alpha, chosen on the validation
# set only (RUN_DIR/selection.json has every candidate's valid BLEU); its beam and alpha are its decode defaults.
# Usage: recipes/multi30k/select_and_test.sh RUN_DIR WORK_DIR
#   RUN_DIR   an `nmt train` run directory
#   WORK_DIR  holds test.src/test.ref (written by run.sh)
# Writes RUN_DIR/test.{hyp,json,moses.json}.
set -euo pipefail
run=${1:?usage: select_and_test.sh RUN_DIR WORK_DIR}
work=${2:?usage: select_and_test.sh RUN_DIR WORK_DIR}
if [ ! -f "$run/final.pt" ]; then
  echo "error: $run/final.pt not found: nmt train writes it at the end of a run that was not stopped by a signal" \
    "(train.select_final); \`nmt train --run-dir $run --resume\` at the run's limit writes it without training" >&2
  exit 1
fi

nmt translate -m "$run/final.pt" -i "$work/test.src" -o "$run/test.hyp"
nmt eval --hyp "$run/test.hyp" --ref "$work/test.ref" --metrics bleu,chrf --json > "$run/test.json"
# As the Multi30k papers: Moses-tokenised, lowercased BLEU (multi-bleu.perl style).
nmt eval --hyp "$run/test.hyp" --ref "$work/test.ref" --moses de --lowercase --json > "$run/test.moses.json"
python - "$run" <<'PY'
import json, sys
run = sys.argv[1]
selection = json.load(open(f"{run}/selection.json"))
chosen = selection["chosen"]
for s in selection["scores"]:
    mark = "   <- chosen" if (s["candidate"], s["alpha"]) == (chosen["candidate"], chosen["alpha"]) else ""
    print(f"   valid BLEU {s['bleu']:6.2f}  {s['candidate']} alpha={s['alpha']}{mark}", file=sys.stderr)
scores = list(json.load(open(f"{run}/test.json"))["scores"].values())
moses = json.load(open(f"{run}/test.moses.json"))["scores"]["bleu"]
print(f"   {run}/final.pt ({chosen['candidate']}), beam {selection['beam']}, alpha {chosen['alpha']}  test2016: "
      + "  ".join(f"{s['name']} {s['score']:.2f}" for s in scores)
      + f"  (Moses-tokenised lowercased BLEU {moses['score']:.2f})")
for s in [*scores, moses]:
    print(f"      {s['name']}|{s['signature']}")
PY
