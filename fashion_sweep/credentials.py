"""Credentials: where they come from (the environment MLflow and the databases already read) and keeping them out
of everything the harness writes.

Owns finding a secret in a URI, redacting it for messages, moving it from a URI a command was given into that
environment, and the credentials of our own requests to an MLflow server. It stores nothing and imports neither
MLflow nor TensorFlow.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlparse

# MLflow's client reads these for every request to a server (mlflow.environment_variables, 3.17).
USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
# Not bare "key": PostgreSQL's ?sslkey= names a file, not a secret.
SECRET_QUERY_WORDS = (
    "password",
    "passwd",
    "pwd",
    "token",
    "secret",
    "signature",
    "credential",
    "api_key",
    "access_key",
)


def secret_query_keys(uri: str) -> list[str]:
    """The query parameters of uri whose names say they hold a secret (?password=..., ?token=...)."""
    return [k for k, _ in parse_qsl(urlparse(uri).query) if any(w in k.lower() for w in SECRET_QUERY_WORDS)]


def has_secret(value: object) -> bool:
    """Whether value is a URI carrying a password (user:password@) or a secret query parameter."""
    if not isinstance(value, str) or "://" not in value:
        return False
    try:
        return urlparse(value).password is not None or bool(secret_query_keys(value))
    except ValueError:  # e.g. a port that is not a number: not a URI we would use
        return False


def redacted(uri: str) -> str:
    """uri with its password and secret query values as ***, for messages."""
    if not has_secret(uri):
        return uri
    parsed = urlparse(uri)
    netloc = parsed.netloc
    if parsed.password is not None:
        netloc = netloc.replace(f":{parsed.password}@", ":***@", 1)
    secret = set(secret_query_keys(uri))
    query = urlencode([(k, "***" if k in secret else v) for k, v in parse_qsl(parsed.query)], safe="*")
    return parsed._replace(netloc=netloc, query=query).geturl()


def where_to_put(uri: str) -> str:
    """Where the credentials of the store at uri belong instead of in the URI."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in ("http", "https"):
        return f"set {USERNAME_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV}) in the environment"
    if scheme == "postgresql":
        return "set PGPASSWORD in the environment or put the password in ~/.pgpass"
    if scheme == "mysql":
        return "put the password in an option file (e.g. ~/.my.cnf) and add ?read_default_file=~/.my.cnf"
    return "give it through the environment or a credentials file your store's client reads"


def secret_refusal(key: str, value: str) -> str | None:
    """The one-line refusal of a config value carrying a secret (Hydra writes what was typed to .hydra/, MLflow
    every param to the store), or None."""
    if not has_secret(value):
        return None
    return f"{key}={redacted(value)} carries a secret, which would be written to .hydra/ and the store: " + (
        f"give the URI without it and {where_to_put(value)}"
    )


def first_secret(values: Iterable[tuple[str, object]]) -> str | None:
    """The refusal for the first (key, value) carrying a secret, or None."""
    for key, value in values:
        if isinstance(value, str) and (refusal := secret_refusal(key, value)):
            return refusal
    return None


def moved_to_environment(uri: str, environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """uri without its password, which goes where the store's client reads it (MLflow's variables for a server,
    PGPASSWORD for PostgreSQL), so that it is neither printed nor passed on a command line (`ps` shows those).
    A URI whose secret has no such place is returned as it is."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if parsed.password is None or scheme not in ("http", "https", "postgresql"):
        return uri
    if scheme == "postgresql":
        environ["PGPASSWORD"] = parsed.password
    else:
        environ[USERNAME_ENV], environ[PASSWORD_ENV] = parsed.username or "", parsed.password
    host = parsed.netloc.rpartition("@")[2]
    user = f"{parsed.username}@" if scheme == "postgresql" and parsed.username else ""
    return parsed._replace(netloc=user + host).geturl()


def request_headers(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The Authorization header MLflow's client would send, from the same environment variables."""
    if token := environ.get(TOKEN_ENV):
        return {"Authorization": f"Bearer {token}"}
    if USERNAME_ENV in environ and PASSWORD_ENV in environ:
        pair = f"{environ[USERNAME_ENV]}:{environ[PASSWORD_ENV]}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
    return {}


def refused_credentials(code: int, environ: Mapping[str, str] = os.environ) -> str:
    """What a server's 401 or 403 means for the credentials in the environment."""
    user = environ.get(USERNAME_ENV)
    if code == 403:
        who = f"user {user!r}" if user else "this token"
        return f"{who} lacks the permission; an admin grants it (docs/beyond-one-machine.md#users-and-permissions)"
    if user or environ.get(TOKEN_ENV):
        who = f"user {user!r} ({USERNAME_ENV}, {PASSWORD_ENV})" if user else TOKEN_ENV
        return f"the server refused the credentials of {who}"
    return f"the server asks for credentials: set {USERNAME_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV})"


def server_refusal(err: BaseException, environ: Mapping[str, str] = os.environ) -> str | None:
    """One line for an MLflow server's 401 or 403 (an MlflowException, read by its error code), or None."""
    code = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(str(getattr(err, "error_code", "")))
    if code is None:
        return None
    endpoint = re.search(r"endpoint (\S+)", str(err))
    return f"{refused_credentials(code, environ)}" + (f" (at {endpoint.group(1)})" if endpoint else "")
