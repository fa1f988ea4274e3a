"""CTranslate2 as a translation engine: the same lines in, the same `LineResult`s out.

`CT2Translator` is a `Translator` whose search runs in CTranslate2 on a folder from
`nmt export`; reading, chunking, normalisation, truncation warnings, empty lines, order
and detokenisation are the nmt translator's own, so `nmt translate --engine ctranslate2`
differs from the nmt engine only in who searches. What each engine's search means:

- Greedy and sampling are the same rules. Outputs are limited to the same per-sentence
  length (`a * src_len + b`, EOS counted); CTranslate2 runs one token short of it, and an
  output cut there gets EOS and its score from a teacher-forced pass (`score_batch`), as
  nmt forces EOS at the limit. Sampled outputs are scored the same way, by the model's own
  log-probabilities, since CTranslate2 reports the tempered, truncated ones.
- Beam search in CTranslate2 refills a beam when a hypothesis ends and stops a sentence once
  `beam` hypotheses finished (nmt's `--early-stop` rule; nmt's exact rule has no equivalent).
  Its finished hypotheses are ranked by nmt's own length penalty, `gnmt` or `average`
  (CTranslate2's `length_penalty` is the average form, which ranks them the same way), so
  `--alpha` and `--length-penalty` mean what they mean in nmt; with alpha 0 CTranslate2
  stops once the best candidate ends, which is exact for nbest 1, as nmt's rule is.
- Scores are the model's log-probabilities, as nmt's: CTranslate2 renormalises after banning a
  token, so PAD and BOS, which nmt bans, are left alone (a trained model never chooses them:
  they are never its targets); banning them would move every score by their probability
  (1e-4 per token on the Multi30k model, whose PAD logit is 0). `--ban-unk` renormalises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from nmt.config import DecodeConfig
from nmt.data import pad_sources
from nmt.errors import NmtError
from nmt.export import ExportedModel, damaged_model_file, pieces, require_ctranslate2
from nmt.precision import Precision
from nmt.search import Hypothesis, check_options, length_penalty, max_output_lengths
from nmt.tokenizer import EOS_ID
from nmt.translate import BATCH_TOKENS, BUFFER_LINES, Translator

Found = tuple[list[int], float | None]  # a hypothesis's ids and raw score (None: still to be teacher-forced)
Scored = tuple[list[int], float]  # ... once every raw score is known
COMPUTE_TYPES = {"auto": "default", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class CT2Translator(Translator):
    """A Translator over a `nmt export` folder whose search runs in CTranslate2 (see the module notes)."""

    def __init__(self, folder: Path, *, decode: DecodeConfig | None = None, device: str = "auto",
                 precision: str = "auto", quantize: str = "none", threads: int = 0,
                 batch_tokens: int = BATCH_TOKENS, buffer_lines: int = BUFFER_LINES) -> None:
        ctranslate2 = require_ctranslate2()
        exported = ExportedModel(folder)
        if batch_tokens < 1 or buffer_lines < 1:
            raise NmtError(f"batch tokens and buffer lines must be positive, got {batch_tokens} and {buffer_lines}")
        self.decode = replace(decode or exported.decode, early_stop=True)  # the only rule CTranslate2 has
        check_options(self.decode)
        self.batch_tokens, self.buffer_lines = batch_tokens, buffer_lines
        self.src_tokenizer, self.tgt_tokenizer = exported.src_tokenizer, exported.tgt_tokenizer
        self.max_source_tokens = exported.max_positions  # EOS included, as the translator truncates
        self.src_pieces, self.tgt_pieces = pieces(self.src_tokenizer), pieces(self.tgt_tokenizer)
        self.tgt_ids = {piece: index for index, piece in enumerate(self.tgt_pieces)}
        if quantize not in ("none", "int8"):
            raise NmtError(f"unknown quantization {quantize!r}; choose one of none, int8")
        compute_type = "int8" if quantize == "int8" else _choice("precision", precision, COMPUTE_TYPES)
        kind, index = _device(device)
        try:
            self.engine = ctranslate2.Translator(str(folder), device=kind, device_index=index,
                                                 compute_type=compute_type, intra_threads=threads)
        except (RuntimeError, ValueError) as exc:
            if damaged_model_file(Path(folder) / "model.bin"):
                raise NmtError(f"{Path(folder) / 'model.bin'}: damaged (not a CTranslate2 model); "
                               "export the checkpoint again") from None
            raise NmtError(f"{folder}: CTranslate2 cannot load it ({str(exc).splitlines()[0]})") from None
        self.precision = Precision(self.engine.compute_type, f"CTranslate2 on {self.engine.device}")
        self.ctranslate2 = ctranslate2

    @classmethod
    def from_folder(cls, path: Path, *, device: str = "auto", precision: str = "auto", quantize: str = "none",
                    threads: int = 0, batch_tokens: int = BATCH_TOKENS, buffer_lines: int = BUFFER_LINES,
                    **decode: Any) -> CT2Translator:
        """Load an export; `decode` options replace the folder's defaults, None keeps them."""
        require_ctranslate2()  # say how to install it before anything else
        if decode.get("early_stop") is False:
            raise NmtError("--exact: CTranslate2 has no exact stopping rule; its beam search stops a sentence once "
                           "beam hypotheses finished (--early-stop)")
        known = {f.name for f in fields(DecodeConfig)}
        if unknown := sorted(set(decode) - known):
            raise NmtError(f"unknown decoding option(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        defaults = ExportedModel(path).decode
        options = replace(defaults, **{k: v for k, v in decode.items() if v is not None})
        return cls(path, decode=options, device=device, precision=precision, quantize=quantize, threads=threads,
                   batch_tokens=batch_tokens, buffer_lines=buffer_lines)

    def search_ids(self, sources: Sequence[Sequence[int]]) -> list[list[Hypothesis]]:
        """Search every source (ids as `encode_source` makes them, EOS last); results in input order.

        Sentences are sorted by length and batched by `batch_tokens` as nmt's translator does. CTranslate2
        takes one length limit per call: a batch runs to its longest sentence's, and an output beyond its own
        sentence's limit is cut there (sorted by length, a batch's limits are close, so that is rare). An
        n-best beam search (nbest > 1) instead never mixes limits, so that no two hypotheses are cut alike.
        """
        results: list[list[Hypothesis]] = [[] for _ in sources]
        if not sources:
            return results
        limits = max_output_lengths(pad_sources(sources)[1], self.decode, self.max_source_tokens).tolist()
        if self.decode.sampling:  # CTranslate2 has one generator per process: seeded per chunk, as nmt's per batch
            self.ctranslate2.set_random_seed(self.decode.seed)
        for chunk in self._batches(sources, limits):
            found = self._search_batch([sources[i] for i in chunk], [limits[i] for i in chunk])
            for index, hypotheses in zip(chunk, found, strict=True):
                results[index] = hypotheses
        return results

    def _batches(self, sources: Sequence[Sequence[int]], limits: list[int]) -> Iterator[list[int]]:
        """Indices, longest first, in runs of at most `batch_tokens` source tokens x rows (and of one length
        limit for an n-best beam search)."""
        rows = max(self.decode.nbest if self.decode.sampling else self.decode.beam, 1)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
        chunk: list[int] = []
        for index in order:
            full = chunk and (len(chunk) + 1) * len(sources[chunk[0]]) * rows > self.batch_tokens
            if full or (chunk and self._beam and self.decode.nbest > 1 and limits[index] != limits[chunk[0]]):
                yield chunk
                chunk = []
            chunk.append(index)
        if chunk:
            yield chunk

    def _search_batch(self, sources: list[Sequence[int]], limits: list[int]) -> list[list[Hypothesis]]:
        """One CTranslate2 call; each output is cut one token short of its sentence's limit (EOS counted)."""
        tokens = [[self.src_pieces[i] for i in source[:-1]] for source in sources]  # CTranslate2 adds EOS
        found: list[list[Found]] = [[([], None)] for _ in sources]  # where nothing but EOS fits
        if max(limits) > 1:
            outputs = self.engine.translate_batch(tokens, **self._options(max(limits) - 1))
            found = [[self._found(h, s, limit) for h, s in zip(o.hypotheses, o.scores, strict=True)]
                     for o, limit in zip(outputs, limits, strict=True)]
        return [self._ranked(hypotheses) for hypotheses in self._teacher_forced(tokens, found)]

    def _options(self, max_length: int) -> dict[str, Any]:
        """translate_batch's options for nmt's decoding options (see the module notes)."""
        d = self.decode
        options: dict[str, Any] = {
            "beam_size": 1 if d.sampling else d.beam,
            "num_hypotheses": d.beam if self._penalised else d.nbest,  # all `beam` finished, for nmt to rank
            "length_penalty": d.alpha if self._penalised else 0.0,
            "max_decoding_length": max_length,
            "min_decoding_length": min(max(d.min_len - 1, 0), max_length),  # nmt counts EOS in min_len
            "disable_unk": d.ban_unk,
            "return_end_token": True,  # so CTranslate2 counts EOS in the length, as nmt does
            "return_scores": True,
            "max_input_length": 0,  # the translator truncated already, keeping EOS
        }
        if d.sampling:
            options.update(sampling_topk=d.top_k, sampling_topp=d.top_p, sampling_temperature=d.temperature)
        return options

    @property
    def _beam(self) -> bool:
        return self.decode.beam > 1 and not self.decode.sampling

    @property
    def _penalised(self) -> bool:
        """Beam search with a length penalty: CTranslate2 divides scores by len^alpha and stops after `beam` ends."""
        return self._beam and self.decode.alpha > 0

    def _found(self, hypothesis: list[str], score: float, limit: int) -> Found:
        """Ids and the summed log-probability; None where it must be teacher-forced (cut at the limit, sampled)."""
        ids = [self.tgt_ids[piece] for piece in hypothesis]
        if len(ids) >= limit:  # greedy and sampled outputs of a batch run to its longest limit
            return ids[: limit - 1], None
        if not ids or ids[-1] != EOS_ID or self.decode.sampling:
            return ids, None
        return ids, score * len(ids) ** (self.decode.alpha if self._penalised else 0.0)

    def _teacher_forced(self, sources: list[list[str]], found: list[list[Found]]) -> list[list[Scored]]:
        """Every hypothesis ended by EOS with its raw score; those without one are scored by `score_batch`."""
        todo = [(i, j) for i, hyps in enumerate(found) for j, (_, raw) in enumerate(hyps) if raw is None]
        targets = [[self.tgt_pieces[t] for t in found[i][j][0] if t != EOS_ID] for i, j in todo]
        scored = self.engine.score_batch([sources[i] for i, _ in todo], targets, max_input_length=0) if todo else []
        forced = {(i, j): ([self.tgt_ids[p] for p in target] + [EOS_ID], float(sum(result.log_probs)))
                  for (i, j), target, result in zip(todo, targets, scored, strict=True)}
        return [[forced.get((i, j)) or (ids, float(raw)) for j, (ids, raw) in enumerate(hyps)]  # type: ignore[arg-type]
                for i, hyps in enumerate(found)]

    def _ranked(self, hypotheses: list[Scored]) -> list[Hypothesis]:
        """nmt's scores (raw / lp(length), EOS counted), best first, the `nbest` best; where two beam outputs
        were cut to the same tokens at their sentence's limit, one is kept."""
        scored = {tuple(ids): Hypothesis(ids, raw / length_penalty(len(ids), self.decode), raw)
                  for ids, raw in hypotheses}
        return sorted(scored.values(), key=lambda h: -h.score)[: self.decode.nbest]


def _choice(option: str, value: str, choices: dict[str, str]) -> str:
    if value not in choices:
        raise NmtError(f"unknown {option} {value!r} for CTranslate2; choose one of {', '.join(choices)}")
    return choices[value]


def _device(device: str) -> tuple[str, int]:
    """nmt's device names as CTranslate2's (kind, index); CTranslate2 runs on CPUs and CUDA GPUs."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and not index.isdigit()):
        raise NmtError(f"device {device!r} is not one CTranslate2 runs on; choose auto, cpu, cuda or cuda:N")
    return kind, int(index or 0)
