"""nmt: a small, fast, complete neural machine translation toolkit.

The public API: `Translator` (text in, text out with one checkpoint file) and
`load_checkpoint`; everything else lives in the submodules.
"""

__version__ = "0.1.0"

from nmt.checkpoint import load_checkpoint
from nmt.translate import Translator

__all__ = ["Translator", "__version__", "load_checkpoint"]
