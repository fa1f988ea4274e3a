"""`nmt serve`, the HTTP translation server, in three parts.

- `service`: the models, their language pairs, the limits and the request path, without HTTP;
- `queue`: the dynamic batching queue and the decoding worker thread of each model;
- `app`: the LibreTranslate-compatible routes on FastAPI and the uvicorn server (imported
  only from `nmt.serve.app`, since FastAPI and uvicorn are an optional extra).
"""

from nmt.serve.service import (
           Limits,
           Pair,
           ServeError,
           Service,
           TranslateRequest,
           check_model,
           resolve_pairs,
           serving_threads,
)

__all__ = ["Limits", "Pair", "ServeError", "Service", "TranslateRequest", "check_model", "resolve_pairs",
           "serving_threads"]
