"""The proxy's name resolution: the sidecar's own resolver, with a short cache and one lookup in flight per
name.

A package manager opens a new connection per request through a proxy (npm 9 opened 151 for an install that
needs 15 direct; bench/install.py), and a lookup per connection turned that into bursts of DNS queries that
the network dropped: each lost query cost the resolver's 5 s retry, some a 502 after 10 s. Caching does not
weaken the rebinding defence: the proxy still checks every address it is given and connects to the very
address it checked; a cached answer is only a few seconds older.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

Lookup = Callable[[str, int], Awaitable[list[str]]]

CACHE_SECONDS = 30.0
"""How long an answer is reused. getaddrinfo gives no TTL; registries' records live minutes or more."""


async def system_lookup(host: str, port: int) -> list[str]:
    """The sidecar's own resolver (its /etc/hosts, then Docker's DNS)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        # Python IDNA-encodes the name before any query, and an empty or over-long label fails there with a
        # UnicodeError: such a name does not resolve, and the proxy expects OSError for that.
        raise OSError(f"not a host name: {exc}") from None
    return [str(i[4][0]) for i in infos]


class CachingResolver:
    """host, port -> addresses; raises OSError when the name does not resolve. Failures are not cached."""

    def __init__(
        self, lookup: Lookup = system_lookup, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lookup = lookup
        self.ttl = ttl
        self.clock = clock
        self._answers: dict[str, tuple[float, list[str]]] = {}
        self._pending: dict[str, asyncio.Future[list[str]]] = {}

    async def __call__(self, host: str, port: int) -> list[str]:
        key = host.lower().rstrip(".")
        hit = self._answers.get(key)
        if hit is not None and self.clock() - hit[0] < self.ttl:
            return list(hit[1])
        pending = self._pending.get(key)
        if pending is not None:
            return list(await asyncio.shield(pending))
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            addresses = await self.lookup(host, port)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else OSError(str(exc)))
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._pending.pop(key, None)
        self._answers[key] = (self.clock(), addresses)
        future.set_result(addresses)
        return list(addresses)
