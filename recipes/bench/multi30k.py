"""Training and decoding benchmarks of the Multi30k models in one table: speed, peak memory and BLEU.

    python recipes/bench/multi30k.py --data work/multi30k/data \
        --model transformer=work/multi30k/transformer/final.pt --model lstm=work/multi30k/lstm/final.pt \
        --src work/multi30k/test.src --ref work/multi30k/test.ref

For every model it runs `train_speed.measure_all` (fp32 and bf16 training of the
reference architecture NAME, one of train_speed.MODELS) and `decode_speed.measure_model`
(greedy and beam 5 with the key/value cache, fp32 / bf16 / int8, on CHECKPOINT), so
one run gives the figures a model is chosen by. Tokens/s are target tokens trained
on in "train" rows and generated in the others.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import machine, print_table, write_json
from decode_speed import measure_model
from nmt.device import tune_cpu
from nmt.translate import BATCH_TOKENS
from train_speed import MODELS, measure_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="directory written by nmt prepare")
    parser.add_argument("--model", action="append", required=True,
                        help=f"NAME=CHECKPOINT (repeatable); NAME is one of {', '.join(MODELS)}")
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--latency-sentences", type=int, default=50)
    parser.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    parser.add_argument("--out", type=Path, default=Path("work/bench/multi30k.json"))
    args = parser.parse_args()
    models = [spec.partition("=")[::2] for spec in args.model]
    if unknown := [name for name, _ in models if name not in MODELS]:
        parser.error(f"unknown model name(s) {', '.join(unknown)}; training is measured for {', '.join(MODELS)}")
    tune_cpu(args.threads)  # what the nmt commands do; the library leaves threads alone
    texts = args.src.read_text(encoding="utf-8").splitlines()
    references = args.ref.read_text(encoding="utf-8").splitlines()
    rows: list[dict[str, Any]] = []
    for name, path in models:
        rows += [{"mode": "train", **row} for row in measure_all(
            args.data, [name], ["fp32", "bf16", "auto"], args.updates, args.warmup, args.max_tokens)]
        rows += measure_model(name, Path(path), texts, references, ["fp32", "bf16", "int8", "auto"],
                              args.latency_sentences, args.batch_tokens, no_cache=False)
    print_table("Multi30k: training and decoding", rows, ["model", "mode", "precision", "tokens_per_s",
                                                          "mfu_model_count", "sentences_per_s", "peak_mib", "bleu",
                                                          "note"])
    write_json(args.out, {"machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
