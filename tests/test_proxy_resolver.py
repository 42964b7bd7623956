"""The proxy's resolver: one lookup in flight per name, answers reused briefly, failures never cached."""

from __future__ import annotations

import asyncio

import pytest

from agent_sandbox.sidecar.resolver import CachingResolver


class FakeDNS:
    def __init__(self) -> None:
        self.queries: list[str] = []
        self.answers: dict[str, list[str]] = {"pypi.org": ["203.0.113.80"]}
        self.gate = asyncio.Event()

    async def __call__(self, host: str, port: int) -> list[str]:
        self.queries.append(host)
        await self.gate.wait()
        if host not in self.answers:
            raise OSError("no such name")
        return self.answers[host]


def test_a_burst_of_connections_makes_one_lookup() -> None:
    async def main() -> None:
        dns = FakeDNS()
        resolve = CachingResolver(dns)
        calls = [asyncio.create_task(resolve("pypi.org", 443)) for _ in range(32)]
        await asyncio.sleep(0)
        dns.gate.set()
        assert await asyncio.gather(*calls) == [["203.0.113.80"]] * 32
        assert dns.queries == ["pypi.org"]
        assert await resolve("PyPI.org.", 443) == ["203.0.113.80"] and dns.queries == ["pypi.org"]

    asyncio.run(main())


def test_answers_expire_and_failures_are_not_cached() -> None:
    async def main() -> None:
        now = [100.0]
        dns = FakeDNS()
        dns.gate.set()
        resolve = CachingResolver(dns, ttl=30, clock=lambda: now[0])
        await resolve("pypi.org", 443)
        now[0] += 29
        await resolve("pypi.org", 443)
        assert dns.queries == ["pypi.org"]
        now[0] += 2
        dns.answers["pypi.org"] = ["203.0.113.81"]
        assert await resolve("pypi.org", 443) == ["203.0.113.81"] and len(dns.queries) == 2
        for _ in range(2):
            with pytest.raises(OSError):
                await resolve("nowhere.example", 443)
        assert dns.queries.count("nowhere.example") == 2

    asyncio.run(main())


def test_waiters_share_a_failure() -> None:
    async def main() -> None:
        dns = FakeDNS()
        resolve = CachingResolver(dns)
        calls = [asyncio.create_task(resolve("nowhere.example", 443)) for _ in range(5)]
        await asyncio.sleep(0)
        dns.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results) and dns.queries == ["nowhere.example"]

    asyncio.run(main())
