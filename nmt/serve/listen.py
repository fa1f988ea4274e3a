"""Where `nmt serve` listens and what it holds open: the options, checked before anything loads."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nmt.errors import NmtError


@dataclass(frozen=True)
class Listen:
    """Where the server listens, how many connections it holds, and how long a shutdown waits."""

    host: str = "127.0.0.1"
    port: int = 5000
    grace: float = 30.0  # seconds queued requests get to finish after SIGTERM/SIGINT, then 503
    max_connections: int = 1000  # open connections; beyond them new ones are closed at once
    idle_timeout: float = 5.0  # seconds a connection may stay silent, or send half its headers

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise NmtError(f"--port must be between 0 and 65535, got {self.port}")
        if not 0 <= self.grace <= 3600:  # also refuses nan and inf
            raise NmtError(f"--grace must be between 0 and 3600 seconds, got {self.grace}")
        if not 0 < self.idle_timeout <= 3600:
            raise NmtError(f"--idle-timeout must be above 0 and at most 3600 seconds, got {self.idle_timeout}")
        if self.max_connections < 1:
            raise NmtError(f"--max-connections must be at least 1, got {self.max_connections}")

    def exposed(self) -> bool:
        """True unless the address is a loopback one (only this machine can connect)."""
        if self.host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: assume others can reach it
            return True
