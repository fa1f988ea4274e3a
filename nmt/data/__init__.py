"""Parallel data: sources, cleaning, encoded memory-mapped storage, token batches.

`prepare` turns raw text into a directory once; the trainer opens it with
`PreparedData.open`, draws batches of indices from `TokenBatchSampler` and pads
them with `collate`. The translator uses `encode_source`/`pad_sources`, the
same source convention `collate` applies (ids + EOS).
"""

from nmt.data.batch import Batch, collate, encode_source, pad_sources, source_ids
from nmt.data.clean import REASONS, CleanConfig
from nmt.data.prepare import Sources, TokenizerTraining, prepare
from nmt.data.sampler import TokenBatchSampler, padding_fraction
from nmt.data.sources import HubDataset, PairSource, TableFile, TextFiles
from nmt.data.store import EncodedSplit, PreparedData

__all__ = [
    "REASONS",
    "Batch",
    "CleanConfig",
    "EncodedSplit",
    "HubDataset",
    "PairSource",
    "PreparedData",
    "Sources",
    "TableFile",
    "TextFiles",
    "TokenBatchSampler",
    "TokenizerTraining",
    "collate",
    "encode_source",
    "pad_sources",
    "padding_fraction",
    "prepare",
    "source_ids",
]
