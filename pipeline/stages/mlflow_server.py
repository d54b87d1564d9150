"""Run the MLflow tracking server a cluster logs to (proxied artifacts).

`mlflow server` over the backend store of mlflow.tracking_uri (sqlite or postgresql://) with
--serve-artifacts, bound to 127.0.0.1 unless --host says otherwise. Point jobs at it with
MLFLOW_TRACKING_URI=http://HOST:PORT (cluster/runtime_env.yaml); artifacts are uploaded through the
server into --artifacts-destination. Runs until Ctrl-C.

`mlflow server` over the backend store of mlflow.tracking_uri (sqlite, or PostgreSQL:
postgresql://user:pass@host/db) with `--serve-artifacts`: clients and Ray workers log over HTTP
and upload artifacts through the server's proxy into --artifacts-destination (a local/shared
path, or s3://, gs://), so no node needs the server's disk. Bound to 127.0.0.1 unless --host says
otherwise. Runs until Ctrl-C / SIGTERM / SIGHUP, then stops the server's whole process tree.

Security (issue 13), see docs/architecture.md "Distributed training and the tracking server":
- a non-loopback --host needs --auth (MLflow's basic-auth app) or an explicit --insecure;
- the Host headers the server accepts (`mlflow server --allowed-hosts`) are the names this
  machine is reached by: the bound address (every interface address for 0.0.0.0), the hostname
  and the FQDN, plus loopback names only when loopback clients can reach the socket (a loopback
  or wildcard bind); MLflow's default private-IP patterns are dropped. --allowed-hosts adds more;
- the admin credentials come from the environment (MLFLOW_AUTH_ADMIN_USERNAME, default admin;
  MLFLOW_AUTH_ADMIN_PASSWORD) or --auth-password-file, never from the command line; clients
  (Ray workers, `segpipe report`, `segpipe predict`) use MLflow's MLFLOW_TRACKING_USERNAME /
  MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile
from pathlib import Path

from pipeline.config import Params
from pipeline.errors import UserError

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]


def add_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; an address of the cluster network, or 0.0.0.0, "
                             "needs --auth or --insecure)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--artifacts-destination", default="mlartifacts", metavar="DIR_OR_URI",
                        help="where proxied artifacts are stored (default ./mlartifacts; s3://... works)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds to wait for the server to answer (default 120)")
    parser.add_argument("--auth", action="store_true",
                        help="MLflow's basic-auth app: every request needs a user and password. The admin user "
                             "is created on first start from MLFLOW_AUTH_ADMIN_USERNAME (default admin) and "
                             "MLFLOW_AUTH_ADMIN_PASSWORD or --auth-password-file (>= 12 characters)")
    parser.add_argument("--auth-password-file", metavar="FILE",
                        help="file holding the admin password (first line), instead of MLFLOW_AUTH_ADMIN_PASSWORD")
    parser.add_argument("--auth-db", metavar="URI",
                        help="the user/permission store of --auth (default sqlite beside a sqlite backend store, "
                             "else ./mlflow-auth.db)")
    parser.add_argument("--allowed-hosts", default="", metavar="H1,H2",
                        help="more Host header values to accept (comma-separated, fnmatch patterns; e.g. a DNS "
                             "alias or a KubeRay service name); added to the defaults (bound address, hostname, FQDN)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without --auth (anyone who reaches the port can write)")


def server_command(store: str, host: str, port: int, artifacts: str, *, allowed_hosts: list[str] | None = None,
                   auth: bool = False) -> list[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
    dest = artifacts if "://" in artifacts else str(Path(artifacts).resolve())
    cmd += ["server", "--backend-store-uri", store, "--serve-artifacts", "--artifacts-destination", dest,
            "--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        cmd += ["--allowed-hosts", ",".join(allowed_hosts)]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _host_entries(name: str) -> list[str]:
    """A name and name:<any port> in MLflow's --allowed-hosts syntax (fnmatch; IPv6 bracketed)."""
    try:
        if ipaddress.ip_address(name).version == 6:
            return [f"[{name}]", f"[[]{name}]:*"]
    except ValueError:
        pass
    return [name, f"{name}:*"]


def _interface_addresses() -> list[str]:
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.append(a.address.split("%")[0])
    return out


def default_allowed_hosts(host: str) -> list[str]:
    """Host header values a server bound to `host` accepts (see the module docstring)."""
    names: list[str] = []
    if _is_wildcard(host):
        names += [a for a in _interface_addresses() if not is_loopback(a)]
    elif not is_loopback(host):
        names.append(host)
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names and not is_loopback(name):
            names.append(name)
    out = [e for n in names for e in _host_entries(n)]
    if is_loopback(host) or _is_wildcard(host):
        out += [e for n in ("localhost", "127.0.0.1") for e in _host_entries(n)] + ["[::1]", "[[]::1]:*"]
    return list(dict.fromkeys(out))


def allowed_hosts(host: str, extra: str) -> list[str]:
    more = [h.strip() for h in extra.split(",") if h.strip()]
    for h in more:
        if any(c in h for c in " /\\@"):
            raise UserError(f"not a host name or pattern: {h!r} (--allowed-hosts)")
    return list(dict.fromkeys(default_allowed_hosts(host) + [e for h in more for e in
                                                              ([h] if "*" in h or ":" in h else _host_entries(h))]))


def _admin_password(args) -> str | None:
    if args.auth_password_file:
        f = Path(args.auth_password_file).expanduser()
        try:
            lines = f.read_text().splitlines()
        except OSError as exc:
            raise UserError(f"cannot read {f}: {exc.strerror} (--auth-password-file)") from None
        if not lines or not lines[0].strip():
            raise UserError(f"{f} is empty (--auth-password-file)")
        return lines[0].strip()
    return os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or None


def auth_setup(args, store: str) -> tuple[dict, Path]:
    """(environment for the server, its auth config file): the admin user and the user store.

    The ini holds no secret (database_uri, admin_username); the password reaches MLflow through
    MLFLOW_AUTH_ADMIN_PASSWORD in the server's environment only, and only matters on first start
    (MLflow creates the admin user once; change it later with MLflow's update-password API)."""
    db = args.auth_db
    if not db:
        if store.startswith("sqlite:///"):
            db = "sqlite:///" + str(Path(store[len("sqlite:///"):]).with_name("mlflow-auth.db"))
        else:
            db = "sqlite:///" + str(Path("mlflow-auth.db").resolve())
    elif db.startswith("sqlite:///") and not db.startswith("sqlite:////"):
        db = "sqlite:///" + str(Path(db[len("sqlite:///"):]).resolve())
    user = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    password = _admin_password(args)
    first_start = not (db.startswith("sqlite:///") and Path(db[len("sqlite:///"):]).is_file())
    if first_start and not password:
        raise UserError("--auth needs the admin password on first start: export MLFLOW_AUTH_ADMIN_PASSWORD "
                        "or give --auth-password-file FILE (never on the command line) (--auth)")
    if password is not None and len(password) < 12:
        raise UserError("the admin password must be at least 12 characters (MLFLOW_AUTH_ADMIN_PASSWORD / "
                        "--auth-password-file)")
    fd, ini = tempfile.mkstemp(prefix="segpipe-mlflow-auth-", suffix=".ini")
    with os.fdopen(fd, "w") as f:  # mkstemp: mode 0600
        f.write("[mlflow]\ndefault_permission = READ\n"
                f"database_uri = {db}\nadmin_username = {user}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    # the auth app's CSRF protection needs a secret key: the user's (shared by several servers), else a fresh one
    import secrets

    env = {"MLFLOW_AUTH_CONFIG_PATH": ini, "MLFLOW_AUTH_ADMIN_USERNAME": user,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32)}
    if password:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    return env, Path(ini)


def run(p: Params, args) -> int:
    from pipeline.stages import ui
    from pipeline.tracking import server_env

    store = p.mlflow.tracking_uri  # the backend store itself: MLFLOW_TRACKING_URI (the server's URL) does not apply
    if store.startswith(("http://", "https://", "databricks")):
        raise UserError(f"mlflow.tracking_uri must be a backend store (sqlite:///mlflow.db, postgresql://...), "
                        f"not a server URL: {store} (mlflow.tracking_uri)")
    if store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
        store = "sqlite:///" + str(Path(store[len("sqlite:///"):]).resolve())
    if not 1 <= args.port <= 65535:
        raise UserError(f"port must be in 1..65535, got {args.port} (--port)")
    remote = not is_loopback(args.host)
    if remote and not args.auth and not args.insecure:
        raise UserError(f"refusing to serve {args.host} without authentication: anyone who reaches port {args.port} "
                        "could read and write every run; add --auth (admin password from MLFLOW_AUTH_ADMIN_PASSWORD "
                        "or --auth-password-file) or, on a network you trust, --insecure (--host)")
    if args.auth_password_file and not args.auth:
        raise UserError("--auth-password-file needs --auth (--auth-password-file)")
    hosts = allowed_hosts(args.host, args.allowed_hosts) if (remote or args.allowed_hosts) else None
    env, ini = auth_setup(args, store) if args.auth else ({}, None)
    cmd = server_command(store, args.host, args.port, args.artifacts_destination, allowed_hosts=hosts, auth=args.auth)
    public = next((h for h in (hosts or []) if "*" not in h and not is_loopback(h.strip("[]"))), args.host)
    banner = [f"  backend store {store}, artifacts proxied to {args.artifacts_destination}",
              f"  clients and Ray jobs: MLFLOW_TRACKING_URI=http://{public}:{args.port}"]
    if hosts:
        banner.append(f"  accepted Host names: {', '.join(h for h in hosts if not h.endswith(':*'))} (--allowed-hosts adds more)")
    if args.auth:
        banner.append(f"  basic auth on (admin user {env['MLFLOW_AUTH_ADMIN_USERNAME']}); clients export "
                      "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    elif remote:
        banner.append("  WARNING: --insecure: no authentication, anyone who reaches this port can write")
    try:
        return ui.serve(cmd, host=args.host, port=args.port, timeout=args.timeout, what="MLflow tracking server",
                        banner=banner, env={**server_env(p), **env})
    finally:
        if ini is not None:
            ini.unlink(missing_ok=True)
