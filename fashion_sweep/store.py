"""Checks a tracking store before anything runs: a scheme MLflow can use, folders it can write, a server that
answers, an experiment whose artifacts every machine reaches.

Owns those checks and the default store's address; it creates nothing and imports neither MLflow nor TensorFlow,
so that a bad store is refused in the second or two a Hydra app takes to start. Runs in the store are runs.py's.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse

from fashion_sweep import credentials
from fashion_sweep.credentials import redacted

STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # each server's default port
SERVER_CHECK_SECONDS = 10  # one bounded request to an MLflow server before any run (MLflow's own retries take minutes)


def default_tracking_uri() -> str:
    """The project's local store, as conf/tracking/local.yaml names it: ./mlruns/mlflow.db."""
    return f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def missing_local_store(uri: str) -> str | None:
    """For the commands that read a store (compare, resume, ui): "no MLflow store at URI" when uri names a SQLite
    file that does not exist (opening it would create an empty store), else None."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"no MLflow store at {uri}"
    return None


class StoreError(Exception):
    """The tracking store cannot work: unknown scheme, unwritable path, unreachable server."""


def check(uri: str, artifact_location: str | None, experiment: str | None = None) -> None:
    """Raise StoreError unless uri names a store MLflow can write to (and, through a server, an experiment whose
    artifacts every machine can reach); creates nothing in MLflow."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in STORE_SCHEMES:
        raise StoreError(
            f"tracking.uri={redacted(uri)} is not a store MLflow >= 3.13 can use: expected sqlite:///PATH, "
            f"http(s)://HOST:PORT of an MLflow server, or a database URI ({', '.join(STORE_SCHEMES[3:])})"
        )
    if scheme == "sqlite":
        writable_folder(Path(uri.removeprefix("sqlite:///")).parent, f"tracking.uri={redacted(uri)}")
        if artifact_location:
            writable_folder(Path(artifact_location), f"tracking.artifact_location={artifact_location}")
    elif scheme in ("http", "https"):
        server_get(uri, "/health")
        if artifact_location and urlparse(artifact_location).scheme in ("", "file"):
            raise StoreError(
                f"tracking.artifact_location={artifact_location} is a folder of one machine, but runs reach the "
                f"store through the server {uri}: set tracking.artifact_location=null (the server's artifact store)"
            )
        if experiment:
            check_artifact_root(uri, experiment)
    elif scheme in DATABASE_PORTS:
        database_answers(uri, scheme)


def server_get(uri: str, path: str) -> bytes:
    """One GET to an MLflow server with a short timeout (MLflow's own client retries for minutes), with the
    credentials MLflow's client would send."""
    request = urllib.request.Request(uri.rstrip("/") + path, headers=credentials.request_headers())
    try:
        with urllib.request.urlopen(request, timeout=SERVER_CHECK_SECONDS) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return b""
        if err.code in (401, 403):
            raise StoreError(f"tracking.uri={redacted(uri)}: {credentials.refused_credentials(err.code)}") from None
        raise StoreError(f"tracking.uri={redacted(uri)}: the server answered {err.code} to {path}") from None
    except (OSError, urllib.error.URLError) as err:
        reason = getattr(err, "reason", err)
        raise StoreError(f"tracking.uri={redacted(uri)}: no MLflow server answers there ({reason})") from None


def check_not_half_migrated(path: Path) -> None:
    """Refuse a SQLite store whose creation or upgrade was interrupted (Alembic's temporary tables are left)."""
    if not path.is_file():
        return
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            left = [name for name in tables if name.startswith("_alembic_tmp_")]
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.Error as err:
        raise StoreError(f"tracking.uri=sqlite:///{path}: not a readable SQLite store ({err})") from None
    if left:
        fix = (
            f"it holds no runs: delete {path} and start again" if runs == 0
            else f"back it up, drop {', '.join(left)} (sqlite3 {path} 'DROP TABLE {left[0]}') and run "
            f"`mlflow db upgrade sqlite:///{path}`"
        )  # fmt: skip
        raise StoreError(f"tracking.uri=sqlite:///{path}: the store was left half-migrated ({', '.join(left)}); {fix}")


def database_answers(uri: str, scheme: str) -> None:
    """A database server listens at the URI's host and port (one TCP connection, bounded): MLflow's own retries
    took 111 s and 45 lines to refuse a PostgreSQL URI with nothing behind it. A URI without a host (a local
    socket) is left to the driver."""
    parsed = urlparse(uri)
    if not parsed.hostname:
        return
    address = (parsed.hostname, parsed.port or DATABASE_PORTS[scheme])
    try:
        socket.create_connection(address, timeout=SERVER_CHECK_SECONDS).close()
    except OSError as err:
        reason = err.strerror or err.__class__.__name__
        raise StoreError(
            f"tracking.uri={redacted(uri)}: no database answers at {address[0]}:{address[1]} ({reason})"
        ) from None


def check_artifact_root(uri: str, experiment: str) -> None:
    """An existing experiment must keep its artifacts where the server, not one machine's disk, holds them."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    answer = server_get(uri, f"/api/2.0/mlflow/experiments/get-by-name?{query}")
    location = json.loads(answer or b"{}").get("experiment", {}).get("artifact_location", "")
    if location and urlparse(location).scheme in ("", "file"):
        raise StoreError(
            f"experiment {experiment!r} keeps its artifacts in {location}, a folder of one machine, but runs reach "
            f"it through the server {uri}: pick a new tracking.experiment=NAME (it gets the server's artifact store)"
        )


def writable_folder(folder: Path, what: str) -> None:
    """Create folder if missing and prove a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise StoreError(f"{what}: cannot write to {folder} ({err.strerror or err})") from None
