"""Cross-attention of a translation: which source pieces each output piece looked at.

The weights come from teacher-forcing the chosen output back through `step`
with `keep_attention=True`, so search itself never computes them and ordinary
translation pays nothing. Because `step` is deterministic and padding-invariant,
the weights are exactly those the decoder used while producing that output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nmt.data import pad_sources
from nmt.device import autocast
from nmt.models import Seq2Seq
from nmt.progress import SILENT, Reporter
from nmt.tokenizer import BOS_ID, Tokenizer
from nmt.translate import LineResult, Translator

CHUNK = 32  # sentences translated and teacher-forced together


@dataclass
class AttentionMap:
    """One sentence's cross-attention, with the pieces that label its axes."""

    line: int  # 1-based input line
    text: str  # the source sentence as given
    translation: str
    source: list[str]  # source pieces, EOS included (S)
    target: list[str]  # output pieces, EOS included (T)
    weights: Tensor  # (L, T, S) per decoder layer (one for an RNN), heads averaged; rows sum to 1
    heads: Tensor | None = None  # (L, H, T, S) each head, when asked of a Transformer
    warning: str | None = None  # the source was truncated to the model's positions: the map shows only the start


@torch.inference_mode()
def cross_attention(model: Seq2Seq, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                    heads: bool = False) -> list[tuple[Tensor, Tensor | None]]:
    """Per sentence, the cross-attention while the model produces `outputs` (ids ending with EOS).

    `sources` are model inputs as `encode_source` makes them. Returns, on the CPU in float32,
    weights (L, T, S) and, if `heads` and the model is a Transformer, per-head weights (L, H, T, S);
    an RNN has a single attention, so its per-head weights are None.
    """
    device = next(model.parameters()).device
    src, src_mask = (t.to(device) for t in pad_sources(sources))  # (B, S)
    tgt_in = pad_sources([[BOS_ID, *ids[:-1]] for ids in outputs])[0].to(device)  # (B, T)
    state = model.init_state(model.encode(src, src_mask), src_mask, keep_attention=True, keep_heads=heads)
    per_head = "attention_heads" in state  # a Transformer's; an RNN has a single attention
    steps, head_steps = [], []
    for t in range(tgt_in.size(1)):
        _, state = model.step(tgt_in[:, t], state)
        steps.append(state["attention"])  # (B, L, S)
        if per_head:
            head_steps.append(state["attention_heads"])  # (B, L, H, S)
    weights = torch.stack(steps, dim=2).float().cpu()  # (B, L, T, S)
    by_head = torch.stack(head_steps, dim=3).float().cpu() if per_head else None  # (B, L, H, T, S)
    return [
        (weights[i, :, : len(out), : len(src_ids)],
         by_head[i, :, :, : len(out), : len(src_ids)] if by_head is not None else None)
        for i, (src_ids, out) in enumerate(zip(sources, outputs, strict=True))
    ]


def pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The subword pieces that label an axis (EOS shows as </s>)."""
    return [tokenizer.id_to_piece(i) for i in ids]


def attention_maps(translator: Translator, texts: Sequence[str], heads: bool = False, first_line: int = 1,
                   reporter: Reporter = SILENT) -> list[AttentionMap]:
    """Translate `texts` with the translator's own settings and return each sentence's attention map.

    Empty lines have no attention and get no map; `line` keeps every map's input line number.
    """
    advance = reporter.task("attention", len(texts), "sentences")
    maps: list[AttentionMap] = []
    pending: list[LineResult] = []
    for result in translator.translate_lines(texts, first_line):
        if result.source_ids:  # empty lines have no map
            pending.append(result)
        if len(pending) == CHUNK:
            maps += _maps(translator, pending, heads)
            pending = []
        advance(1)
    return maps + _maps(translator, pending, heads)


def _maps(translator: Translator, results: list[LineResult], heads: bool) -> list[AttentionMap]:
    """Teacher-force a few translated lines to read their attention."""
    if not results:
        return []
    outputs = [result.best.tokens for result in results]
    with autocast(translator.device, translator.amp_dtype):
        attention = cross_attention(translator.model, [r.source_ids for r in results], outputs, heads)
    return [
        AttentionMap(line=result.line, text=result.text, translation=result.best.text,
                     source=pieces(translator.src_tokenizer, result.source_ids),
                     target=pieces(translator.tgt_tokenizer, out),
                     weights=weights, heads=by_head, warning=result.warning)
        for result, out, (weights, by_head) in zip(results, outputs, attention, strict=True)
    ]
