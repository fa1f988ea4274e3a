"""The `nmt` command line: a thin Typer layer over the `nmt` library."""
