"""`nmt serve`, the HTTP translation server.

- `service`: the models, the limits and the request path, without HTTP; `pairs`: their language pairs;
- `queue`: the dynamic batching queue (fair turns, slices) and each model's decoding thread;
- `body`: what `POST /translate` accepts and how its body is read; `keys`: API keys and rates;
- `app`: the LibreTranslate-compatible routes on FastAPI;
- `listen`: where it listens and what it holds open; `server`: uvicorn with its connection limits.

`app`, `body` and `server` need FastAPI and uvicorn, an optional extra: import them from their modules.
"""

from nmt.serve.pairs import Pair, resolve_pairs
from nmt.serve.service import Limits, ServeError, Service, TranslateRequest, check_model, serving_threads

__all__ = ["Limits", "Pair", "ServeError", "Service", "TranslateRequest", "check_model", "resolve_pairs",
           "serving_threads"]
