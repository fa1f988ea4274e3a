"""nmt: a small, fast, complete neural machine translation toolkit."""

__version__ = "0.1.0"
