"""API keys, LibreTranslate's way: a request names its key in the `api_key` field (JSON or form).

Given `--api-keys FILE` (one key a line; blank lines and `#` comments ignored), `/translate`
answers 403 to a request without a listed key, and, with `--key-rate N`, 429 with
`Retry-After` to a key past N requests a minute (a token bucket: N at once, then one every
60/N seconds). Without keys anyone who can reach the port can use the server.
"""

from __future__ import annotations

import hmac
import math
import time
from pathlib import Path

from nmt.errors import NmtError
from nmt.serve.service import ServeError


class ApiKeys:
    """The keys a server accepts, and each key's request budget."""

    def __init__(self, keys: set[str], per_minute: int = 0) -> None:
        if not keys:
            raise NmtError("no API keys given")
        if per_minute < 0:
            raise NmtError(f"--key-rate must be >= 0 (0: no limit), got {per_minute}")
        self.keys, self.per_minute = keys, per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (requests left, when counted)

    @classmethod
    def load(cls, path: Path, per_minute: int = 0) -> ApiKeys:
        """Read the keys file once, at start: an unreadable or empty one is a one-line error."""
        if not path.is_file():
            raise NmtError(f"{path}: no such file of API keys" if not path.exists()
                           else f"{path}: not a regular file of API keys")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise NmtError(f"{path}: cannot read API keys ({getattr(exc, 'strerror', None) or exc})") from None
        keys = {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
        if not keys:
            raise NmtError(f"{path}: no API keys in it (one a line; # starts a comment)")
        return cls(keys, per_minute)

    def check(self, key: str) -> None:
        """403 unless `key` is listed (compared in constant time); 429 once it is past its rate."""
        if not key:
            raise ServeError(403, "api_key: this server requires an API key")
        if not any(hmac.compare_digest(key.encode(), known.encode()) for known in self.keys):
            raise ServeError(403, "api_key: not a key this server accepts")
        if self.per_minute:
            self._spend(key)

    def _spend(self, key: str) -> None:
        now = time.monotonic()
        left, then = self._buckets.get(key, (float(self.per_minute), now))
        left = min(float(self.per_minute), left + (now - then) * self.per_minute / 60)
        if left < 1:
            wait = math.ceil((1 - left) * 60 / self.per_minute)
            raise ServeError(429, f"api_key: more than {self.per_minute} requests a minute", retry_after=wait)
        self._buckets[key] = (left - 1, now)
