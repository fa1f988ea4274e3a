#!/usr/bin/env bash
# Multi30k English->German end to end: tokenizer -> prepare -> train -> translate -> eval. `nmt train`
# ends with RUN_DIR/final.pt: best.pt or the average of the last checkpoints, and the length penalty,
# chosen on the validation set; select_and_test.sh translates test2016 once with it.
#
# Usage: recipes/multi30k/run.sh [--data DIR] [--work DIR] [--minutes N] [--models "auto transformer lstm gru"]
#                               [--vocab N|auto]
#   --data     folder with train/valid/test2016 .en/.de; default ../shared/data/multi30k-en-de beside the
#              repository, else the Hugging Face hub dataset bentrevett/multi30k
#   --work     where every artefact goes (default: work/multi30k in the repository; git ignores it)
#   --minutes  training budget per model in wall-clock minutes (0 = the configs' epoch limits)
#   --models   which configs of this folder to train (default: "transformer lstm"); "auto" trains with no
#              config at all: nmt train sizes the Transformer to the corpus and the budget
#   --vocab    BPE vocabulary size (default 8000, what the configs were tuned with; "auto": chosen from the corpus)
# Extra `nmt train` overrides can be given in NMT_TRAIN_ARGS, e.g. NMT_TRAIN_ARGS="--set train.max_updates=500".
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
data=$root/../shared/data/multi30k-en-de
work=$root/work/multi30k
minutes=0
models="transformer lstm"
vocab=8000
while [ $# -gt 0 ]; do
  case $1 in
    --data) data=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --vocab) vocab=$2; shift 2 ;;
    *) echo "error: unknown argument $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
mkdir -p "$work"

echo "== 1. data: clean, train a joint BPE tokenizer ($vocab pieces), encode once"
if [ -f "$work/data/meta.json" ]; then
  echo "   $work/data exists, reused"
elif [ -f "$data/train.en" ]; then
  nmt prepare -o "$work/data" --train-tokenizer --vocab-size "$vocab" \
    --train-src "$data/train.en" --train-tgt "$data/train.de" \
    --valid-src "$data/valid.en" --valid-tgt "$data/valid.de" \
    --test-src "$data/test2016.en" --test-tgt "$data/test2016.de"
else
  echo "   $data not found: using the Hugging Face hub dataset bentrevett/multi30k"
  nmt prepare -o "$work/data" --train-tokenizer --vocab-size "$vocab" --hf-dataset bentrevett/multi30k \
    --src-field en --tgt-field de --hf-valid-split validation --hf-test-split test
fi
python - "$work/data" "$work" <<'PY'
import sys
from nmt.data import PreparedData
data = PreparedData.open(sys.argv[1])
for split in ("valid", "test"):
    sources, references = data.split(split).texts()
    for name, lines in ((f"{split}.src", sources), (f"{split}.ref", references)):
        with open(f"{sys.argv[2]}/{name}", "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
PY

for model in $models; do
  run=$work/$model
  config=()
  [ "$model" != auto ] && config=(--config "$here/$model.toml")
  echo "== 2. train $model (${config[1]:-no config: sized to the corpus and the budget})"
  budget=()
  [ "$minutes" != 0 ] && budget=(--max-minutes "$minutes")
  if ls "$run"/update_*.pt >/dev/null 2>&1; then
    nmt train --run-dir "$run" --resume "${budget[@]}" ${NMT_TRAIN_ARGS:-}
  else
    nmt train "${config[@]}" --data "$work/data" --run-dir "$run" "${budget[@]}" ${NMT_TRAIN_ARGS:-}
  fi
  echo "== 3. translate and score test2016 once with final.pt (chosen on valid by nmt train)"
  bash "$here/select_and_test.sh" "$run" "$work"
done

echo
echo "Translate with a trained model (final.pt: the weights and alpha chosen on valid):"
first=${models%% *}
echo "   echo 'A man is riding a bicycle.' | nmt translate -m $work/$first/final.pt"
