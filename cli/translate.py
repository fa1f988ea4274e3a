"""`nmt translate` and `nmt average`: decoding with one checkpoint file, and checkpoint averaging."""

from __future__ import annotations

import functools
import inspect
import io
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Annotated, Any, TypeVar, get_type_hints

import typer

from cli.common import err_console, handle_errors, reporting, summary_table
from nmt.checkpoint import average_checkpoints
from nmt.device import tune_cpu
from nmt.errors import NmtError
from nmt.io import LineStream, atomic_path, check_readable, count_lines, is_stream
from nmt.train import last_checkpoints
from nmt.translate import BATCH_TOKENS, BUFFER_LINES, LineResult, Translator

F = TypeVar("F", bound=Callable[..., Any])
ENGINES = ("nmt", "ctranslate2")
ENGINE_HELP = (
    "nmt, or ctranslate2: search in CTranslate2 on a folder from nmt export (-m FOLDER); same input, output, "
    "normalisation and length limits. Its beam search refills beams and always stops a sentence once beam "
    "hypotheses finished (as --early-stop; --exact is refused); its finished hypotheses are ranked by nmt's "
    "--length-penalty and --alpha (CTranslate2's own length_penalty is the average form; GNMT is applied by nmt). "
    "Sampling draws differ from nmt's; --precision picks the compute type, --quantize int8 computes in int8."
)


def format_result(result: LineResult, nbest: bool, scores: bool) -> str:
    """One line per input (or `nbest` lines: index<TAB>score<TAB>text, index counting from 0)."""
    if nbest:
        return "".join(f"{result.line - 1}\t{h.score:.4f}\t{h.text}\n" for h in result.hypotheses)
    if scores:
        return f"{result.best.score:.4f}\t{result.best.text}\n"
    return result.best.text + "\n"


def warn(message: str) -> None:
    err_console.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)


def results_with_warnings(results: Iterable[LineResult]) -> Iterator[LineResult]:
    """Pass results on, printing each one's warning (a truncated line) on stderr."""
    for result in results:
        if result.warning:
            warn(result.warning)
        yield result


def build_translator(model: Path, threads: int, **options: Any) -> Translator:
    """Tune the process (the CLI's opt-in), load the checkpoint, and say what precision=auto measured."""
    tune_cpu(threads)
    translator = Translator.from_checkpoint(model, **options)
    if translator.precision.speedups:  # "auto" measured this machine: say what it found
        err_console.print(f"precision: {translator.precision.describe()}", highlight=False, markup=False,
                          soft_wrap=True)
    return translator


@dataclass
class DecodingOptions:
    """Search and runtime options shared by `nmt translate` and `nmt eval -m`.

    Search options left at None keep the value stored in the checkpoint.
    """

    beam: Annotated[int | None, typer.Option(help="Beam size; 1 is greedy search.")] = None
    alpha: Annotated[float | None, typer.Option(help="Length penalty exponent; 0 turns it off.")] = None
    length_penalty: Annotated[str | None, typer.Option(
        help="gnmt: ((5+len)/6)^alpha, or average: len^alpha (EOS counts in len).")] = None
    max_len_a: Annotated[float | None, typer.Option(help="Output limit per sentence: a * source length + b.")] = None
    max_len_b: Annotated[int | None, typer.Option(help="Output limit per sentence: a * source length + b.")] = None
    min_len: Annotated[int | None, typer.Option(help="Never end a translation before this many tokens.")] = None
    ban_unk: Annotated[bool | None, typer.Option("--ban-unk/--allow-unk", help="Never produce <unk>.")] = None
    early_stop: Annotated[bool | None, typer.Option(
        "--early-stop/--exact",
        help="Stop a sentence once beam hypotheses finished (faster, may miss the best).")] = None
    sampling: Annotated[bool | None, typer.Option("--sample/--no-sample", help="Sample instead of searching.")] = None
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens (0 = all).")] = None
    top_p: Annotated[float | None, typer.Option(
        help="Sample among the smallest set of tokens with this much probability.")] = None
    sample_seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None
    batch_tokens: Annotated[int, typer.Option(help="Source tokens × beam per batch.")] = BATCH_TOKENS
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto"
    precision: Annotated[str, typer.Option(
        help="auto (bf16 where measured faster: on GPUs and some CPUs), fp32, bf16 or fp16 (GPU).")] = "auto"
    quantize: Annotated[str, typer.Option(help="none, or int8: dynamic int8 linear layers (CPU).")] = "none"
    threads: Annotated[int, typer.Option(help="CPU threads (0 = all cores).")] = 0

    def translator(self, model: Path, nbest: int | None = None, buffer_lines: int = BUFFER_LINES,
                   engine: str = "nmt") -> Translator:
        """Load `model` with these options (`nbest` only matters to nmt translate) for nmt's engine or CTranslate2."""
        if self.batch_tokens < 1:
            raise NmtError("--batch-tokens must be positive")
        if engine not in ENGINES:
            raise NmtError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        options = asdict(self)
        options["seed"], options["nbest"] = options.pop("sample_seed"), nbest
        if engine == "ctranslate2":
            from nmt.engines import CT2Translator  # imports ctranslate2, an optional extra, only when asked for

            return CT2Translator.from_folder(model, buffer_lines=buffer_lines, **options)
        return build_translator(model, options.pop("threads"), buffer_lines=buffer_lines, **options)


def with_decoding_options(command: F) -> F:
    """Give a Typer command every DecodingOptions field as an option; it receives them as `decoding`.

    Typer reads options from the signature, so the shared options are declared once, in
    DecodingOptions, rather than repeated in every command that decodes.
    """
    hints = get_type_hints(DecodingOptions, include_extras=True)
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
              for f in fields(DecodingOptions)]
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "decoding"]

    @functools.wraps(command)
    def wrapper(**options: Any) -> Any:
        decoding = DecodingOptions(**{f.name: options.pop(f.name) for f in fields(DecodingOptions)})
        return command(decoding=decoding, **options)

    wrapper.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


@handle_errors
@with_decoding_options
def translate(
    model: Annotated[Path, typer.Option("--model", "-m", help=(
        "Checkpoint file (from nmt train or nmt average), or with --engine ctranslate2 a folder from nmt export."))],
    input: Annotated[Path | None, typer.Option(
        "--input", "-i", help="Input file; default: standard input, translated as lines arrive.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output file, written atomically; default: standard output.")] = None,
    nbest: Annotated[int | None, typer.Option(
        help="Print the N best translations: index<TAB>score<TAB>translation "
             "(index from 0; an empty line has one, empty).")] = None,
    scores: Annotated[bool, typer.Option("--scores", help="Print score<TAB>translation.")] = False,
    buffer_size: Annotated[int, typer.Option(help="Lines read, sorted and batched at a time.")] = BUFFER_LINES,
    errors: Annotated[str, typer.Option(
        help="strict: stop at invalid UTF-8; replace: substitute U+FFFD and continue.")] = "strict",
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "nmt",
    *,
    decoding: DecodingOptions,
) -> None:
    """Translate text with a checkpoint (or a CTranslate2 export): stdin to stdout, or between files."""
    if errors not in ("strict", "replace"):
        raise NmtError(f"--errors must be strict or replace, got {errors!r}")
    if buffer_size < 1:
        raise NmtError("--buffer-size must be positive")
    translator = decoding.translator(model, nbest, buffer_size, engine)
    show_nbest = (nbest or 0) > 1
    start = time.perf_counter()
    if input is None:
        _translate_stream(translator, LineStream(sys.stdin.buffer, errors, "stdin"), _utf8_stdout(), show_nbest, scores)
        return
    check_readable(input, stream_ok=True, empty_ok=True)  # an empty file translates to an empty file, as stdin does
    # a pipe can be read only once: no line count first
    total = None if is_stream(input) else count_lines(input) if input.stat().st_size else 0
    with open(input, "rb") as source, reporting() as reporter:
        advance = reporter.task("translating", total, "sentences")
        lines_in = LineStream(source, errors, str(input))
        if output is None:
            lines = _translate_stream(translator, lines_in, _utf8_stdout(), show_nbest, scores, advance)
        else:
            with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as sink:
                lines = _translate_stream(translator, lines_in, sink, show_nbest, scores, advance)
    seconds = time.perf_counter() - start
    err_console.print(summary_table("Translation", [
        ("sentences", lines), ("time", f"{seconds:.1f} s"), ("sentences/s", f"{lines / max(seconds, 1e-9):.1f}"),
        ("beam", translator.decode.beam), ("precision", translator.precision.describe()),
        ("output", str(output or "stdout")),
    ]))


def _utf8_stdout() -> IO[str]:
    """Input is read as UTF-8 whatever the locale, so translations are written as UTF-8 too."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(encoding="utf-8")
    return sys.stdout


def _translate_stream(translator: Translator, lines: LineStream, sink: IO[str], nbest: bool, scores: bool,
                      advance: Any = None) -> int:
    """Write each line's translation as soon as it is there (flushed: a pipe's reader sees it at once)."""
    done = 0
    for result in results_with_warnings(translator.translate_lines(lines)):
        sink.write(format_result(result, nbest, scores))
        sink.flush()
        done += 1
        if advance is not None:
            advance(1)
    return done


@handle_errors
def average(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoints to average, or one run directory with --last.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Averaged checkpoint, without training state.")],
    last: Annotated[int | None, typer.Option(
        help="With a run directory: average its last N update checkpoints.", show_default=False)] = None,
) -> None:
    """Average the parameters of checkpoints into one deployable checkpoint (one file = export)."""
    paths = list(checkpoints)
    if last is not None and last < 1:
        raise NmtError(f"--last must be 1 or more, got {last}")
    if last:
        if len(paths) != 1 or not paths[0].is_dir():
            raise NmtError("--last N takes exactly one run directory")
        found = last_checkpoints(paths[0], last)
        if not found:
            raise NmtError(f"{paths[0]}: no update_*.pt checkpoints")
        if len(found) < last:
            warn(f"{paths[0]} holds only {len(found)} update checkpoint(s); averaging those, not {last}")
        paths = found
    averaged = average_checkpoints(paths)
    averaged.save(output)
    err_console.print(summary_table("Averaged checkpoint", [
        ("inputs", "\n".join(str(p) for p in paths)), ("output", str(output)),
    ]))
