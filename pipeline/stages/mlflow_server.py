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

Security (issues 13, 24.10), see docs/architecture.md "Distributed training and the tracking server":
- a non-loopback --host needs --auth (MLflow's basic-auth app) or an explicit --insecure;
- the Host headers the server accepts (`mlflow server --allowed-hosts`, always given: MLflow's
  defaults would accept every private address) are the names this machine is reached by: on a
  loopback bind the loopback names only (localhost, 127.0.0.1, [::1], any port); otherwise the
  bound address (every interface address for 0.0.0.0), the hostname and the FQDN, plus the
  loopback names for a wildcard bind. --allowed-hosts adds more;
- the admin credentials come from the environment (MLFLOW_AUTH_ADMIN_USERNAME, default admin;
  MLFLOW_AUTH_ADMIN_PASSWORD) or --auth-password-file (refused unless only its owner can read
  it, as ssh does with keys), never from the command line; clients (Ray workers, `segpipe
  report`, `segpipe predict`) use MLflow's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD;
- failed logins are throttled per client address (pipeline.tracking.throttle.LoginThrottle: after
  --auth-max-failures within --auth-failure-window seconds, 429 with Retry-After). The app is
  MLflow's basic-auth app wrapped by tracking.throttle.throttled_auth_app, declared to `mlflow
  server --app-name` through an `mlflow.app` entry point in a temporary dist-info on the
  server's PYTHONPATH; uvicorn runs with --no-proxy-headers (X-Forwarded-For from a local
  process would pick the client address) unless FORWARDED_ALLOW_IPS names the proxies to trust.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.stages.ui import LOOPBACK_HOSTS
from pipeline.tracking.throttle import LOGIN_ENV, LOGIN_MAX_FAILURES, LOGIN_WINDOW_S

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]
AUTH_APP = "segpipe-basic-auth"  # the `mlflow.app` entry point auth_setup declares


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
    parser.add_argument("--auth-max-failures", type=int, metavar="N",
                        help=f"failed logins from one client address within --auth-failure-window before it gets "
                             f"429 (default {LOGIN_MAX_FAILURES})")
    parser.add_argument("--auth-failure-window", type=float, metavar="S",
                        help=f"seconds a failed login counts against its address (default {LOGIN_WINDOW_S:g})")
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
        cmd += ["--app-name", AUTH_APP]
        if "FORWARDED_ALLOW_IPS" not in os.environ:  # the throttle keys on the TCP peer, not on X-Forwarded-For
            cmd.append("--uvicorn-opts=--no-proxy-headers")
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
    if is_loopback(host):  # only loopback clients reach the socket: no other name is this server
        return list(LOOPBACK_HOSTS)
    names: list[str] = []
    if _is_wildcard(host):
        names += [a for a in _interface_addresses() if not is_loopback(a)]
    elif not is_loopback(host):
        names.append(host)
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names and not is_loopback(name):
            names.append(name)
    out = [e for n in names for e in _host_entries(n)]
    if _is_wildcard(host):
        out += LOOPBACK_HOSTS
    return list(dict.fromkeys(out))


def allowed_hosts(host: str, extra: str) -> list[str]:
    more = [h.strip() for h in extra.split(",") if h.strip()]
    for h in more:
        if any(c in h for c in " /\\@"):
            raise UserError(f"not a host name or pattern: {h!r} (--allowed-hosts)")
    return list(dict.fromkeys(default_allowed_hosts(host) + [e for h in more for e in
                                                              ([h] if "*" in h or ":" in h else _host_entries(h))]))


def _read_private(f: Path) -> str:
    """The text of a file only its owner may read or write (as ssh wants of a key): a password
    others can read is refused before it is used."""
    try:
        with open(f, encoding="utf-8", errors="replace") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise UserError(f"{f} is accessible by other users (mode {stat.S_IMODE(mode):04o}): the admin password "
                                f"must be private; run `chmod 600 {f}` (--auth-password-file)")
            return fh.read()
    except OSError as exc:
        raise UserError(f"cannot read {f}: {exc.strerror} (--auth-password-file)") from None


def _admin_password(args) -> str | None:
    if args.auth_password_file:
        f = Path(args.auth_password_file).expanduser()
        lines = _read_private(f).splitlines()
        if not lines or not lines[0].strip():
            raise UserError(f"{f} is empty (--auth-password-file)")
        return lines[0].strip()
    return os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or None


def _app_dir(ini_text: str) -> Path:
    """A private temporary directory (0700) with the auth config and a dist-info declaring the
    `mlflow.app` entry point AUTH_APP (`mlflow server --app-name` finds apps only through entry
    points), for the server's PYTHONPATH; removed when the server stops."""
    d = None
    try:
        d = Path(tempfile.mkdtemp(prefix="segpipe-mlflow-auth-"))
        (d / "basic_auth.ini").write_text(ini_text)
        meta = d / "segpipe_mlflow_app-0.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: segpipe-mlflow-app\nVersion: 0\n")
        (meta / "entry_points.txt").write_text(f"[mlflow.app]\n{AUTH_APP} = pipeline.tracking.throttle:throttled_auth_app\n")
    except OSError as exc:
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        raise UserError(f"cannot write the server's auth config to {tempfile.gettempdir()}: {exc.strerror}; "
                        "free space there or point TMPDIR elsewhere (TMPDIR)") from None
    return d


def auth_setup(args, store: str) -> tuple[dict, Path]:
    """(environment for the server, its private temporary directory): the admin user, the user
    store, the throttled app (_app_dir) and its limits.

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
    d = _app_dir("[mlflow]\ndefault_permission = READ\n"
                 f"database_uri = {db}\nadmin_username = {user}\n"
                 "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    # the auth app's CSRF protection needs a secret key: the user's (shared by several servers), else a fresh one
    import secrets

    import pipeline

    path = [str(d), str(Path(pipeline.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(d / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": user,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join(x for x in path if x),
           LOGIN_ENV[0]: str(args.auth_max_failures), LOGIN_ENV[1]: str(args.auth_failure_window)}
    if password:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    return env, d


def _check_auth_args(args) -> None:
    """The --auth-* options need --auth and sensible values; fills in the throttle's defaults."""
    for name in ("auth_password_file", "auth_max_failures", "auth_failure_window"):
        if getattr(args, name) is not None and not args.auth:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} needs --auth ({flag})")
    if args.auth_max_failures is None:
        args.auth_max_failures = LOGIN_MAX_FAILURES
    if args.auth_failure_window is None:
        args.auth_failure_window = LOGIN_WINDOW_S
    if args.auth_max_failures < 1:
        raise UserError(f"--auth-max-failures must be at least 1, got {args.auth_max_failures} (--auth-max-failures)")
    if not 0 < args.auth_failure_window < float("inf"):
        raise UserError(f"--auth-failure-window must be a positive number of seconds, got "
                        f"{args.auth_failure_window:g} (--auth-failure-window)")


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
    _check_auth_args(args)
    hosts = allowed_hosts(args.host, args.allowed_hosts)  # always: MLflow's defaults accept any private address
    public = next((h for h in hosts if "*" not in h and not is_loopback(h.strip("[]"))), args.host) if remote else args.host
    banner = [f"  backend store {store}, artifacts proxied to {args.artifacts_destination}",
              f"  clients and Ray jobs: MLFLOW_TRACKING_URI=http://{public}:{args.port}",
              f"  accepted Host names: {', '.join(h for h in hosts if not h.endswith(':*'))} (--allowed-hosts adds more)"]
    if remote and not args.auth:
        banner.append("  WARNING: --insecure: no authentication, anyone who reaches this port can write")
    env, tmp = auth_setup(args, store) if args.auth else ({}, None)
    try:
        if args.auth:
            banner += [f"  basic auth on (admin user {env['MLFLOW_AUTH_ADMIN_USERNAME']}); clients export "
                       "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
                       f"  a client address with {args.auth_max_failures} failed logins within "
                       f"{args.auth_failure_window:g} s gets 429 until they age out"]
        cmd = server_command(store, args.host, args.port, args.artifacts_destination, allowed_hosts=hosts,
                             auth=args.auth)
        return ui.serve(cmd, host=args.host, port=args.port, timeout=args.timeout, what="MLflow tracking server",
                        banner=banner, env={**server_env(p), **env})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
