"""A seeded random Transformer for speed work: the quick-start shape without the training.

    python recipes/bench/random_model.py --spm spm.model -o work/bench/random.pt

Operator counts and step times do not depend on what the weights learned, only on the shapes and on how
long the outputs are. A random decoder rarely chooses EOS, so every output would run to its length limit;
here one channel of the decoder's output carries only the position encoding (cos(0.1 * position)) and
EOS reads it, so EOS grows likely with every token and outputs end at mixed lengths, about as long as
real translations. Its BLEU means nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nmt.checkpoint import Checkpoint
from nmt.config import Config, ModelConfig
from nmt.models import build_model
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


def random_checkpoint(tokenizer: Tokenizer, seed: int = 1, eos_weight: float = 4.0) -> Checkpoint:
    """d_model 256, 3 + 3 layers, pre-norm, sinusoidal positions, a joint vocabulary (see the module notes);
    the output layer is untied so that EOS's row can read the position channel alone."""
    config = Config()
    config.model = ModelConfig(src_vocab_size=tokenizer.vocab_size, tgt_vocab_size=tokenizer.vocab_size,
                               joint_vocab=True, tie_output=False, dropout=0.0)
    torch.manual_seed(seed)
    model = build_model(config.model).eval()
    d = config.model.d_model
    position = 2 * (d // 8) + 1  # sinusoid channel 2k + 1 is cos(10000^(-2k/d) * position) = cos(0.1 * position)
    with torch.no_grad():
        for layer in model.decoder:  # no sub-layer writes to the position channel
            for linear in (layer.self_attn.out, layer.cross_attn.out, layer.ffn[3]):
                linear.weight[position], linear.bias[position] = 0.0, 0.0
        model.embed.tgt.weight[:, position] = 0.0
        model.output.weight[:, position] = 0.0
        model.output.weight[EOS_ID, position] = -eos_weight
        model.output.weight[[PAD_ID, BOS_ID]] = 0.0
    return Checkpoint(config=config, model_state=model.state_dict(), src_tokenizer=tokenizer,
                      tgt_tokenizer=tokenizer, languages=("en", "de"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spm", type=Path, required=True, help="a joint SentencePiece model (e.g. from nmt prepare)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random_checkpoint(Tokenizer.load(args.spm), args.seed).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
