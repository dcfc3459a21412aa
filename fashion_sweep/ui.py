"""`fashion-sweep-ui`: the MLflow UI on this project's store, bound to 127.0.0.1, with one worker.

Owns starting the UI for a local user; it never writes to the store.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fashion_sweep import credentials, runs, store


def ui_command(tracking_uri: str, port: int) -> list[str]:
    """`mlflow ui` on 127.0.0.1 only; one worker is plenty for one user (four take ~2 GB)."""
    mlflow_ui = [sys.executable, "-m", "mlflow", "ui"]
    return [
        *mlflow_ui,
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def landing_page(uri: str, base: str) -> str:
    """The page to open first, in the UI's model-training mode: the latest sweep's parent run, else the runs of the
    experiment written last, else the UI's start."""
    client = MlflowClient(uri)
    try:
        parent = runs.find_parent(client, None)
        return runs.ui_address(base, parent.info.experiment_id, parent.info.run_id)
    except LookupError:
        pass
    latest = client.search_experiments(order_by=["last_update_time DESC"], max_results=1)
    return runs.ui_address(base, latest[0].experiment_id) if latest else base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fashion-sweep-ui", description="Browse the runs in the MLflow UI.")
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: ./mlruns/mlflow.db)")
    args = parser.parse_args(argv)
    uri = credentials.moved_to_environment(args.tracking_uri or store.default_tracking_uri())
    if missing := store.missing_local_store(uri):
        sys.exit(f"fashion-sweep-ui: {missing}; run `fashion-sweep` first or pass --tracking-uri")
    try:
        page = landing_page(uri, f"http://127.0.0.1:{args.port}")
    except MlflowException as err:
        sys.exit(f"fashion-sweep-ui: {credentials.server_refusal(err) or runs.error_summary(err)} ({uri})")
    print(f"MLflow UI: {page}  (store {store.redacted(uri)}; Ctrl-C stops it)", flush=True)
    command = ui_command(uri, args.port)
    os.execv(command[0], command)  # the UI replaces this process, so Ctrl-C and SIGTERM reach it directly


if __name__ == "__main__":
    main()
