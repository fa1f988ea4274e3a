#!/usr/bin/env bash
# Fine-tune a pretrained OPUS-MT (MarianMT) model on a domain, end to end: import it, prepare the domain's data
# with its tokenizers, score it on the domain's test set, fine-tune it for a time budget, score it again, export
# it to CTranslate2 and print the command that serves it.
#
# Without --model the model is built here (make_marian.py, needs transformers): a randomly initialised MarianMT
# folder of OPUS-MT's shape, its SentencePiece models trained on the domain's training text. It knows nothing:
# its BLEU before fine-tuning is near zero, and a few minutes on a CPU teach it little, so it shows the steps,
# not what fine-tuning gains. With access to the Hugging Face hub, fine-tune the real model instead:
#   bash recipes/finetune/run.sh --model Helsinki-NLP/opus-mt-en-de
#
# Usage: recipes/finetune/run.sh [--model DIR|HUB_ID] [--data DIR] [--pair en-de] [--work DIR] [--minutes N]
#                                [--pairs N] [--test-lines N]
#   --model       a MarianMT folder or hub model id (default: the random model, built in WORK/opus-mt-PAIR)
#   --data        folder with train, valid and test2016 files of the pair (train.en, train.de, ...); default
#                 $NMT_FINETUNE_DATA, else ../shared/data/multi30k-en-de beside the repository
#   --pair        source and target languages, the files' suffixes (default en-de)
#   --work        where every artefact goes (default: work/finetune in the repository; git ignores it); a rerun
#                 with the same --work reuses the model, the data and the run there (training resumes)
#   --minutes     fine-tuning budget in wall-clock minutes, validation included (default 10)
#   --pairs       fine-tune on the first N training pairs only (default 0: all)
#   --test-lines  score the first N test sentences only (default 0: all)
# Extra options: NMT_TRAIN_ARGS for nmt train (default: validation and the final choice on 200 sentences each),
# NMT_MARIAN_ARGS for make_marian.py (e.g. "--d-model 64 --layers 1 --ffn 128" for a quick try).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
model=""
data=${NMT_FINETUNE_DATA:-$root/../shared/data/multi30k-en-de}
pair=en-de
work=$root/work/finetune
minutes=10
pairs=0
test_lines=0
while [ $# -gt 0 ]; do
  case $1 in
    --model) model=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --pair) pair=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --pairs) pairs=$2; shift 2 ;;
    --test-lines) test_lines=$2; shift 2 ;;
    *) echo "error: unknown argument $1 (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
src=${pair%%-*}
tgt=${pair#*-}
for split in train valid test2016; do
  for lang in "$src" "$tgt"; do
    if [ ! -f "$data/$split.$lang" ]; then
      echo "error: $data/$split.$lang not found (--data: a folder with train, valid and test2016 files of $pair)" >&2
      exit 1
    fi
  done
done
mkdir -p "$work"
first() {  # first N FILE: its first N lines, all of them for 0
  if [ "$1" = 0 ]; then cat "$2"; else head -n "$1" "$2"; fi
}

echo "== 1. domain data: training pairs ($([ "$pairs" = 0 ] && echo all || echo "the first $pairs")) and test set"
for lang in "$src" "$tgt"; do
  first "$pairs" "$data/train.$lang" > "$work/train.$lang"
done
first "$test_lines" "$data/test2016.$src" > "$work/test.src"
first "$test_lines" "$data/test2016.$tgt" > "$work/test.ref"

echo "== 2. the pretrained model, imported into one nmt checkpoint"
if [ -z "$model" ]; then
  model=$work/opus-mt-$pair
  if [ -f "$model/config.json" ]; then
    echo "   $model exists, reused"
  else
    echo "   no --model: building a randomly initialised OPUS-MT-shaped model (its BLEU will be near zero)"
    python "$here/make_marian.py" --src "$work/train.$src" --tgt "$work/train.$tgt" --pair "$pair" -o "$model" \
      ${NMT_MARIAN_ARGS:-}
  fi
fi
if [ -f "$work/model.pt" ]; then
  echo "   $work/model.pt exists, reused"
else
  nmt import "$model" -o "$work/model.pt"
fi

echo "== 3. prepare the domain's data with the model's tokenizers"
if [ -f "$work/data/meta.json" ]; then
  echo "   $work/data exists, reused"
else
  nmt prepare --tokenizer-from "$work/model.pt" -o "$work/data" \
    --train-src "$work/train.$src" --train-tgt "$work/train.$tgt" \
    --valid-src "$data/valid.$src" --valid-tgt "$data/valid.$tgt" \
    --test-src "$data/test2016.$src" --test-tgt "$data/test2016.$tgt"
fi

echo "== 4. before fine-tuning: translate and score the test set (the model's own decoding defaults)"
nmt translate -m "$work/model.pt" -i "$work/test.src" -o "$work/before.hyp"
nmt eval --hyp "$work/before.hyp" --ref "$work/test.ref" --metrics bleu,chrf

echo "== 5. fine-tune for $minutes minutes (nmt train --init-from: fine-tuning rate and warm-up unless set)"
run=$work/run
# Validation and the final choice on 200 sentences each: a 6+6-layer model decodes slowly on a CPU.
train_args=${NMT_TRAIN_ARGS:---set train.valid_max_sentences=200 --set train.select_max_sentences=200}
if ls "$run"/update_*.pt >/dev/null 2>&1; then
  nmt train --run-dir "$run" --resume --max-minutes "$minutes" $train_args
else
  nmt train --init-from "$work/model.pt" --data "$work/data" --run-dir "$run" --max-minutes "$minutes" $train_args
fi
if [ ! -f "$run/final.pt" ]; then
  echo "error: $run/final.pt not found: nmt train writes it at the end of a run not stopped by a signal;" \
    "rerun this script to finish the run" >&2
  exit 1
fi

echo "== 6. after fine-tuning: translate and score again, compared with before (paired bootstrap)"
nmt translate -m "$run/final.pt" -i "$work/test.src" -o "$work/after.hyp"
nmt eval --hyp "$work/after.hyp" --ref "$work/test.ref" --baseline "$work/before.hyp" --metrics bleu,chrf

echo "== 7. export to CTranslate2"
served=$run/final.pt
if python -c "import ctranslate2" 2>/dev/null; then
  nmt export "$run/final.pt" -o "$work/model.ct2" --overwrite
  # CTranslate2's beam stops once `beam` hypotheses finished (nmt's --early-stop), so its BLEU may differ a little
  nmt translate --engine ctranslate2 -m "$work/model.ct2" -i "$work/test.src" -o "$work/after.ct2.hyp"
  nmt eval --hyp "$work/after.ct2.hyp" --ref "$work/test.ref" --metrics bleu,chrf
  served=$work/model.ct2
else
  echo "   skipped: CTranslate2 is not installed (pip install 'nmt[ct2]'); the server below runs the checkpoint"
fi

echo
echo "Serve the fine-tuned model with LibreTranslate's API (needs nmt[serve]; Ctrl-C stops it):"
echo "   nmt serve -m $served --port 5000"
echo "   curl -s localhost:5000/translate -H 'Content-Type: application/json' \\"
echo "        -d '{\"q\": \"A man is riding a bicycle.\", \"source\": \"$src\", \"target\": \"$tgt\"}'"
