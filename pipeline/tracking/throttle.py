"""The failed-login throttle of `segpipe mlflow-server --auth`: LoginThrottle, an ASGI middleware
around MLflow's basic-auth app, and throttled_auth_app, the uvicorn factory the server's entry point
names (pipeline/stages/mlflow_server.py declares it to `mlflow server --app-name`)."""

from __future__ import annotations

import os

LOGIN_MAX_FAILURES, LOGIN_WINDOW_S = 10, 60.0  # defaults of --auth-max-failures / --auth-failure-window
LOGIN_ENV = ("SEGPIPE_AUTH_MAX_FAILURES", "SEGPIPE_AUTH_FAILURE_WINDOW_S")  # how the server process gets them


class LoginThrottle:
    """ASGI middleware in front of MLflow's basic-auth app. A request carrying credentials
    (Authorization / X-MLflow-Authorization) counts as a login attempt of its client (an IP
    address; an IPv6 /64) while it is served, and as a failure from when it is answered 401. A
    client with `max_failures` attempts and failures within `window` seconds gets 429 with
    Retry-After for every request with new credentials until the oldest leaves the window: so
    neither a sequence nor a parallel burst of guesses gets further. Credentials that already
    worked on a protected route (kept as keyed hashes in memory) pass, so the clients behind one
    address (NAT, a proxy) that are logged in keep working while a guesser there is held up."""

    MAX_CLIENTS, MAX_GOOD = 100_000, 4096

    def __init__(self, app, max_failures: int, window: float, public=lambda path: False):
        self.app, self.max_failures, self.window, self.public = app, max_failures, window, public
        self.attempts: dict[str, list[float]] = {}
        self.good: dict[bytes, None] = {}
        self._key = os.urandom(32)

    @staticmethod
    def client(scope) -> str:
        import ipaddress

        host = (scope.get("client") or ("?",))[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host
        if ip.version == 6 and ip.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(getattr(ip, "ipv4_mapped", None) or ip)

    def recent(self, who: str, now: float) -> list[float]:
        """`who`'s attempts within the window (the list itself, pruned in place)."""
        if who not in self.attempts and len(self.attempts) >= self.MAX_CLIENTS:
            for k in [k for k, ts in self.attempts.items() if max(ts, default=0.0) <= now - self.window]:
                del self.attempts[k]
            while len(self.attempts) >= self.MAX_CLIENTS:
                del self.attempts[next(iter(self.attempts))]
        times = self.attempts.setdefault(who, [])
        times[:] = [t for t in times if t > now - self.window]
        return times

    async def __call__(self, scope, receive, send):
        import hmac
        import math
        import time

        creds = [v for k, v in scope.get("headers", ()) if k in (b"authorization", b"x-mlflow-authorization")]
        if scope["type"] != "http" or not creds:
            return await self.app(scope, receive, send)
        digest, who, now = hmac.digest(self._key, b"\0".join(creds), "sha256"), self.client(scope), time.monotonic()
        pending = digest not in self.good  # an attempt to count; known credentials count only if refused now
        times = self.recent(who, now)
        if pending and len(times) >= self.max_failures:
            return await _too_many(send, max(1, math.ceil(min(times) + self.window - now)))
        if pending:
            times.append(now)
        seen = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            status = seen.get("status")
            if pending and now in times:
                times.remove(now)
            if status == 401:  # a failure counts from when it was answered (checking a password takes a while)
                self.good.pop(digest, None)
                times.append(time.monotonic())
            if status is not None and status < 400 and not self.public(scope.get("path", "")):
                self.good[digest] = None
                while len(self.good) > self.MAX_GOOD:
                    del self.good[next(iter(self.good))]


async def _too_many(send, retry: int) -> None:
    body = f"Too many failed logins from this address: retry in {retry} s\n".encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", str(retry).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def throttled_auth_app():
    """The app of `segpipe mlflow-server --auth` (a uvicorn factory, loaded through the `mlflow.app`
    entry point the command declares): MLflow's basic-auth app behind LoginThrottle, its limits from
    LOGIN_ENV."""
    from mlflow.server.auth import create_app, is_unprotected_route

    return LoginThrottle(create_app(), int(os.environ.get(LOGIN_ENV[0], LOGIN_MAX_FAILURES)),
                         float(os.environ.get(LOGIN_ENV[1], LOGIN_WINDOW_S)), public=is_unprotected_route)


