"""The `nmt` command: one Typer app, one thin function per subcommand."""

from __future__ import annotations

import os
import signal
from typing import Annotated

import typer

from cli.attention import attention
from cli.common import on_sigterm
from cli.evaluate import evaluate
from cli.export import export
from cli.importer import import_model
from cli.plot import plot
from cli.prepare import prepare
from cli.serve import serve
from cli.tokenizer import tokenizer
from cli.train import train
from cli.translate import average, translate
from nmt import __version__

app = typer.Typer(
    name="nmt",
    help="Neural machine translation: tokenizer, prepare, train, translate, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"nmt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks instead of one-line errors (or set NMT_DEBUG=1).")] = False,
) -> None:
    """Neural machine translation: tokenizer, prepare, train, translate, eval."""
    if debug:
        os.environ["NMT_DEBUG"] = "1"


app.command(name="tokenizer")(tokenizer)
app.command(name="prepare")(prepare)
app.command(name="train")(train)
app.command(name="translate")(translate)
app.command(name="average")(average)
app.command(name="eval")(evaluate)
app.command(name="attention")(attention)
app.command(name="plot")(plot)
app.command(name="export")(export)
app.command(name="import")(import_model)
app.command(name="serve")(serve)


def main() -> None:
    signal.signal(signal.SIGTERM, on_sigterm)  # `nmt train` saves a checkpoint on it too
    app()


if __name__ == "__main__":
    main()
