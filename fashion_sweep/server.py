"""`fashion-sweep-server`: the project's MLflow tracking server, for sweeps whose jobs run on other machines.

Owns starting `mlflow server` on a store it has opened once: runs and metrics in --backend-store-uri, artifacts
proxied through the server (--serve-artifacts) into --artifacts-destination, so no worker writes a local path.
Binds 127.0.0.1 unless --host says otherwise. With --auth, MLflow's basic-auth app asks every request for a user
(its user database beside the store; the first admin's password from MLFLOW_AUTH_ADMIN_PASSWORD, never an argument).
A password in a store URI is handed to the server through the environment, not its command line. It never writes
runs itself.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from fashion_sweep import credentials, store

PROG = "fashion-sweep-server"


def default_artifacts() -> str:
    return str(Path.cwd() / "mlruns" / "server-artifacts")


def check_backend(uri: str) -> None:
    """Open the store once, or exit with one line saying why not (a missing folder of a SQLite file is created)."""
    import sqlalchemy

    try:
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlalchemy.create_engine(uri)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as err:
        sys.exit(f"{PROG}: --backend-store-uri {store.redacted(uri)}: its driver is not installed ({err.name})")
    except Exception as err:  # sqlalchemy's errors span drivers; the first line says what went wrong
        first_line = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        sys.exit(f"{PROG}: cannot open the store --backend-store-uri {store.redacted(uri)}: {first_line}")


def check_artifacts(destination: str) -> None:
    """A local artifacts destination must be a folder this server can write; remote ones (s3://...) MLflow checks."""
    if urlparse(destination).scheme in ("", "file"):
        folder = Path(destination.removeprefix("file://"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".write-test").touch()
            (folder / ".write-test").unlink()
        except OSError as err:
            sys.exit(f"{PROG}: cannot write --artifacts-destination {destination} ({err.strerror or err})")


def auth_database(backend_store_uri: str) -> str:
    """Where --auth keeps its users: basic_auth.db beside a SQLite store, else the store's own database (MLflow's
    auth tables, users and roles..., and their version table alembic_version_auth do not meet the tracking ones)."""
    if backend_store_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(backend_store_uri.removeprefix('sqlite:///')).parent / 'basic_auth.db'}"
    return backend_store_uri


def auth_config(database_uri: str, default_permission: str, cache_seconds: int) -> str:
    """Write the basic-auth app's settings (MLFLOW_AUTH_CONFIG_PATH) to a new file; they hold no secret: the admin's
    password comes from MLFLOW_AUTH_ADMIN_PASSWORD, a database's from PGPASSWORD or ~/.pgpass."""
    text = (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # mlflow 3.17 (PR #22817; older versions ignore the key): a worker trusts a password it verified for this
        # long instead of hashing it again (scrypt: ~0.4 s a request through one worker, 2026-12-06) on each of a
        # sweep's hundreds of requests.
        f"auth_cache_ttl_seconds = {cache_seconds}\n"
    )
    with tempfile.NamedTemporaryFile("w", prefix="fashion-sweep-auth-", suffix=".ini", delete=False) as file:
        file.write(text)
    return file.name


def check_admin_password(database_uri: str) -> None:
    """The first start of --auth creates the user admin with MLFLOW_AUTH_ADMIN_PASSWORD; refuse to start without it
    (an argument would show in `ps`). Once the user database exists, MLflow ignores it."""
    new = database_uri.startswith("sqlite:///") and not Path(database_uri.removeprefix("sqlite:///")).is_file()
    if new and not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        sys.exit(
            f"{PROG}: --auth creates the user admin on its first start: set MLFLOW_AUTH_ADMIN_PASSWORD in the "
            "environment (not on the command line, which `ps` shows)"
        )


def server_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", args.backend_store_uri,
        "--serve-artifacts", "--artifacts-destination", args.artifacts_destination,
        "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
        *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="MLflow tracking server for fashion-sweep runs on many machines (artifacts proxied through it).",
        epilog="Arguments after -- go to `mlflow server` as they are, e.g. -- --allowed-hosts mlflow.lab:5000",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    parser.add_argument("--backend-store-uri", default=None, help="runs and metrics (default: ./mlruns/mlflow.db)")
    parser.add_argument("--artifacts-destination", default=None, help="artifacts (default: ./mlruns/server-artifacts)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default: 2)")
    parser.add_argument(
        "--auth", action="store_true",
        help="ask every request for a user (MLflow's basic-auth app); the first start needs MLFLOW_AUTH_ADMIN_PASSWORD",
    )  # fmt: skip
    parser.add_argument(
        "--auth-database-uri", default=None,
        help="--auth's users and permissions (default: basic_auth.db beside a SQLite store, else the store's database)",
    )  # fmt: skip
    parser.add_argument(
        "--default-permission", default="READ", choices=["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"],
        help="--auth: what every user may do in an experiment no one granted them (default: READ, MLflow's)",
    )  # fmt: skip
    parser.add_argument(
        "--auth-cache-seconds", type=int, default=60, metavar="SECONDS",
        help="--auth: how long a worker trusts a password it verified (default: 60; 0: verify every request)",
    )  # fmt: skip
    args, extra = parser.parse_known_args(argv)
    if args.auth_cache_seconds < 0:
        parser.error(f"--auth-cache-seconds {args.auth_cache_seconds}: expected 0 or more")
    extra = [a for a in extra if a != "--"]
    backend = credentials.moved_to_environment(args.backend_store_uri or store.default_tracking_uri())
    args.backend_store_uri = backend
    args.artifacts_destination = args.artifacts_destination or default_artifacts()
    check_backend(args.backend_store_uri)
    check_artifacts(args.artifacts_destination)
    if args.auth:
        users = credentials.moved_to_environment(args.auth_database_uri or auth_database(backend))
        check_admin_password(users)
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = auth_config(users, args.default_permission, args.auth_cache_seconds)
        # mlflow 3.17's basic-auth app refuses to start without one CSRF key shared by its workers; a new random
        # one per start only voids sign-up forms left open across a restart.
        os.environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        extra = ["--app-name", "basic-auth", *extra]
    access = "users from --auth" if args.auth else "open to all who reach it"
    print(
        f"{PROG}: http://{args.host}:{args.port}  (store {store.redacted(backend)}; {access}; Ctrl-C stops it)",
        flush=True,
    )
    # mlflow 3.17 starts a job-execution service of its own (9 processes in all) unless told not to.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = server_command(args, extra)
    os.execv(command[0], command)  # the server replaces this process: Ctrl-C and SIGTERM reach it directly


if __name__ == "__main__":
    main()
