"""Validation during training: loss and perplexity on the whole validation set, BLEU/chrF on a capped part.

What bounds its cost: the loss is one teacher-forced pass (cheap); decoding is what costs,
and an untrained model runs every sentence to its length limit. So BLEU decodes greedily only
the first `max_sentences` sentences, with outputs of at most 1.2 * source length + 10 tokens
(translation's default allows 1.5 * source + 10), and reports its progress. Under DDP every rank
takes its share of the batches and sentences, and the sums and translations are gathered, so no
rank idles while another validates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from nmt.config import Config, DecodeConfig
from nmt.data import EncodedSplit, PreparedData, TokenBatchSampler, source_ids
from nmt.device import autocast
from nmt.distributed import Distributed
from nmt.evaluate import corpus_scores
from nmt.loss import label_smoothed_loss
from nmt.progress import SILENT, Reporter
from nmt.tokenizer import Tokenizer
from nmt.translate import translate_ids

VALID_MAX_LEN_A, VALID_MAX_LEN_B = 1.2, 10
BATCHES_PER_STEP = 4  # progress advances after about this many decoding batches


def validation_search(decode: DecodeConfig) -> DecodeConfig:
    """Greedy search with the validation length limit (or the run's own, where tighter)."""
    return replace(decode, beam=1, nbest=1, sampling=False, max_len_a=min(decode.max_len_a, VALID_MAX_LEN_A),
                   max_len_b=min(decode.max_len_b, VALID_MAX_LEN_B))


class Validator:
    """Scores a model on one validation split, with its own batch budget and sentence cap."""

    def __init__(self, split: EncodedSplit, tokenizer: Tokenizer, decode: DecodeConfig, *, batch_tokens: int,
                 max_sentences: int, bleu: bool, label_smoothing: float, device: torch.device,
                 amp_dtype: torch.dtype | None, dist: Distributed | None = None) -> None:
        self.split, self.tokenizer, self.search = split, tokenizer, validation_search(decode)
        self.dist = dist or Distributed()
        self.batch_tokens, self.bleu, self.label_smoothing = batch_tokens, bleu, label_smoothing
        self.sentences = len(split) if not max_sentences else min(len(split), max_sentences)
        self.device, self.amp_dtype = device, amp_dtype

    @classmethod
    def for_run(cls, data: PreparedData, config: Config, device: torch.device,
                amp_dtype: torch.dtype | None, dist: Distributed | None = None) -> Validator | None:
        """The validator of a training run (None when the data has no valid split), with the run's batch size."""
        if not data.has_split("valid"):
            return None
        train = config.train
        return cls(data.split("valid"), data.tgt_tokenizer, config.decode, batch_tokens=train.max_tokens,
                   max_sentences=train.valid_max_sentences, bleu=train.valid_bleu,
                   label_smoothing=train.label_smoothing, device=device, amp_dtype=amp_dtype, dist=dist)

    @torch.inference_mode()
    def __call__(self, model: nn.Module, update: int, epoch: int, reporter: Reporter = SILENT) -> dict[str, Any]:
        """The `valid` record of metrics.jsonl: loss and ppl; with BLEU on, also bleu, chrf, bleu_sentences, example."""
        model.eval()
        record: dict[str, Any] = {"kind": "valid", "update": update, "epoch": epoch, **self._loss(model)}
        if self.bleu:
            hypotheses = self._decode(model, reporter)
            scores = corpus_scores(hypotheses, self.split.references()[: self.sentences], metrics=("bleu", "chrf"))
            record.update(bleu=scores["bleu"].score, chrf=scores["chrf"].score, bleu_sentences=self.sentences,
                          example=hypotheses[0] if hypotheses else "")
        return record

    def _loss(self, model: nn.Module) -> dict[str, float]:
        """Teacher-forced loss per target token, and perplexity, over the whole split (this rank's batches,
        summed over ranks on the device and read once)."""
        split, dist = self.split, self.dist
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, NLL, target tokens
        sampler = TokenBatchSampler(split.src_lengths, split.tgt_lengths, self.batch_tokens, seed=0, shuffle=False)
        for batch_ids in sampler.batches(1)[dist.rank::dist.world_size]:
            batch = split.batch(batch_ids).to(self.device)
            with autocast(self.device, self.amp_dtype):
                features = model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
                loss, nll = label_smoothed_loss(features, model.output_projection(), batch.tgt_out,
                                                self.label_smoothing, bias=model.output_bias())
            sums += torch.stack([loss.double(), nll.double(), sums.new_full((), float(batch.tgt_tokens))])
        loss_sum, nll_sum, tokens = dist.sum_tensor(sums).tolist()
        return {"loss": loss_sum / tokens, "ppl": math.exp(min(nll_sum / tokens, 50.0))}

    def _decode(self, model: nn.Module, reporter: Reporter) -> list[str]:
        """Greedy translations of the first `sentences` sources, in order: this rank translates every
        world_size-th one, a few batches at a time for progress, and the ranks' translations are gathered."""
        dist = self.dist
        mine = list(range(dist.rank, self.sentences, dist.world_size))
        sources = [source_ids(self.split[i][0]) for i in mine]
        translated: dict[int, str] = {}
        advance = reporter.task("validation BLEU", total=len(sources), unit="sentences")
        for chunk in length_chunks(sources, self.batch_tokens * BATCHES_PER_STEP):
            with autocast(self.device, self.amp_dtype):
                results = translate_ids(model, [sources[i] for i in chunk], self.search, self.batch_tokens, self.device)
            for index, found in zip(chunk, results, strict=True):
                translated[mine[index]] = self.tokenizer.decode(found[0].tokens)
            advance(len(chunk))
        gathered = {index: text for part in dist.gather_object(translated) for index, text in part.items()}
        return [gathered[index] for index in range(self.sentences)]


def length_chunks(sources: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
    """Indices longest first, cut into chunks of about `tokens` source tokens (a sentence translates the
    same in any batch, so chunking changes only when progress is shown)."""
    chunks: list[list[int]] = [[]]
    total = 0
    for index in sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True):
        if chunks[-1] and total + len(sources[index]) > tokens:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += len(sources[index])
    return [chunk for chunk in chunks if chunk]
