"""pipeline.tracking.throttle.LoginThrottle, the failed-login throttle of `segpipe mlflow-server --auth`,
against a stand-in ASGI app (the real server: tests/integration/test_mlflow_server.py): N failures
from one address -> 429 with Retry-After for new credentials, other addresses and known-good
credentials unaffected, a parallel burst capped at N, a public route never vouches for credentials,
the window frees the address again."""

from __future__ import annotations

import asyncio
import base64

import pytest

from pipeline.tracking.throttle import LoginThrottle

GOOD = "admin:correct-horse-battery-staple"


class FakeAuthApp:
    """200 for GOOD credentials (and for anything on the public /health), else 401; `gate`, when
    set, holds every response until it opens (requests in flight)."""

    def __init__(self):
        self.calls, self.gate = 0, None

    async def __call__(self, scope, receive, send):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        auth = dict(scope["headers"]).get(b"authorization", b"")
        ok = scope["path"] == "/health" or auth == b"Basic " + base64.b64encode(GOOD.encode())
        await send({"type": "http.response.start", "status": 200 if ok else 401, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _scope(creds: str | None, client: str = "198.51.100.7", path: str = "/api/2.0/mlflow/experiments/search"):
    headers = [(b"host", b"localhost")]
    if creds is not None:
        headers.append((b"authorization", b"Basic " + base64.b64encode(creds.encode())))
    return {"type": "http", "path": path, "headers": headers, "client": (client, 40000)}


async def _call(app, scope) -> tuple[int, dict]:
    out = {}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], dict(message["headers"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    await app(scope, receive, send)
    return out["status"], out["headers"]


def _run(app, scope) -> tuple[int, dict]:
    return asyncio.run(_call(app, scope))


@pytest.fixture
def clock(monkeypatch):
    import time

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    return now


def test_failures_from_one_address_get_429_until_the_window_passes(clock):
    inner = FakeAuthApp()
    app = LoginThrottle(inner, max_failures=3, window=60, public=lambda p: p == "/health")
    for i in range(3):
        assert _run(app, _scope(f"admin:wrong-{i}"))[0] == 401
    status, headers = _run(app, _scope("admin:wrong-3"))
    assert status == 429 and headers[b"retry-after"] == b"60"
    assert _run(app, _scope(GOOD))[0] == 429          # the right password is no oracle while held up
    assert inner.calls == 3                            # refused before MLflow checks anything
    assert _run(app, _scope(None))[0] == 401           # no credentials: not a login, passes through
    assert _run(app, _scope(GOOD, client="203.0.113.9"))[0] == 200   # another address
    assert _run(app, _scope("admin:wrong", client="203.0.113.9"))[0] == 401
    assert _run(app, _scope(GOOD))[0] == 200           # credentials that worked pass a held-up address (NAT)
    assert _run(app, _scope("admin:wrong-4"))[0] == 429
    clock[0] += 30
    assert _run(app, _scope("admin:wrong-4"))[1][b"retry-after"] == b"30"
    clock[0] += 31
    assert _run(app, _scope("admin:wrong-5"))[0] == 401  # the window passed


def test_ipv6_clients_are_counted_per_64():
    app = LoginThrottle(FakeAuthApp(), max_failures=2, window=60)
    assert _run(app, _scope("admin:a", client="2001:db8:1:2::1"))[0] == 401
    assert _run(app, _scope("admin:b", client="2001:db8:1:2::ffff"))[0] == 401
    assert _run(app, _scope("admin:c", client="2001:db8:1:2:aaaa::3"))[0] == 429
    assert _run(app, _scope("admin:d", client="2001:db8:1:3::1"))[0] == 401


def test_a_parallel_burst_is_capped():
    async def burst():
        inner = FakeAuthApp()
        inner.gate = asyncio.Event()
        app = LoginThrottle(inner, max_failures=3, window=60)
        tasks = [asyncio.create_task(_call(app, _scope(f"admin:guess-{i}"))) for i in range(20)]
        await asyncio.sleep(0.05)
        inner.gate.set()
        return inner.calls, [s for s, _ in await asyncio.gather(*tasks)]

    calls, statuses = asyncio.run(burst())
    assert calls == 3 and sorted(statuses) == [401] * 3 + [429] * 17


def test_a_public_route_does_not_vouch_for_credentials():
    """A guess sent to /health (200 for anyone) first must still be held up later."""
    app = LoginThrottle(FakeAuthApp(), max_failures=1, window=60, public=lambda p: p == "/health")
    assert _run(app, _scope("admin:guess-a", path="/health"))[0] == 200
    assert _run(app, _scope("admin:guess-b"))[0] == 401
    assert _run(app, _scope("admin:guess-a"))[0] == 429  # not remembered as working
