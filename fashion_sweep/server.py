"""`fashion-sweep-server`: the project's MLflow tracking server, for sweeps whose jobs run on other machines.

Owns starting `mlflow server` on a store it has opened once: runs and metrics in --backend-store-uri, artifacts
proxied through the server (--serve-artifacts) into --artifacts-destination, so no worker writes a local path.
Binds 127.0.0.1 unless --host says otherwise. It never writes runs itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from fashion_sweep import store

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
        sys.exit(f"{PROG}: --backend-store-uri {uri}: its database driver is not installed ({err.name})")
    except Exception as err:  # sqlalchemy's errors span drivers; the first line says what went wrong
        first_line = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        sys.exit(f"{PROG}: cannot open the store --backend-store-uri {uri}: {first_line}")


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
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    args.backend_store_uri = args.backend_store_uri or store.default_tracking_uri()
    args.artifacts_destination = args.artifacts_destination or default_artifacts()
    check_backend(args.backend_store_uri)
    check_artifacts(args.artifacts_destination)
    print(f"{PROG}: http://{args.host}:{args.port}  (store {args.backend_store_uri}; Ctrl-C stops it)", flush=True)
    # mlflow 3.17 starts a job-execution service of its own (9 processes in all) unless told not to.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = server_command(args, extra)
    os.execv(command[0], command)  # the server replaces this process: Ctrl-C and SIGTERM reach it directly


if __name__ == "__main__":
    main()
