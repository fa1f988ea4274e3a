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
from nmt.models.transformer import Transformer
from nmt.progress import SILENT, Reporter
from nmt.tokenizer import BOS_ID, Tokenizer
from nmt.translate import Translator, one_line, translate_ids

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
    per_head = heads and isinstance(model, Transformer)
    options = {"keep_heads": True} if per_head else {}
    state = model.init_state(model.encode(src, src_mask), src_mask, keep_attention=True, **options)
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
        for i, (src_ids, out) in enumerate(zip(sources, outputs))
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
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start:start + CHUNK]
        encoded = [(offset, translator._encode(text, first_line + start + offset)) for offset, text in enumerate(chunk)]
        encoded = [(offset, ids) for offset, ids in encoded if ids is not None]  # empty lines have no map
        sources = [ids for _, ids in encoded]
        with torch.inference_mode(), autocast(translator.device, translator.amp_dtype):
            found = translate_ids(translator.model, sources, translator.decode, translator.batch_tokens, translator.device)
        outputs = [hypotheses[0].tokens for hypotheses in found]
        attention = cross_attention(translator.model, sources, outputs, heads) if sources else []
        for (offset, src_ids), out, (weights, by_head) in zip(encoded, outputs, attention):
            maps.append(AttentionMap(
                line=first_line + start + offset, text=chunk[offset], translation=one_line(translator.tgt_tokenizer.decode(out)),
                source=pieces(translator.src_tokenizer, src_ids), target=pieces(translator.tgt_tokenizer, out),
                weights=weights, heads=by_head,
            ))
        advance(len(chunk))
    return maps
