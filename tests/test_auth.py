"""A team's server with users (`fashion-sweep-server --auth`, MLflow's basic-auth app) and no secret written
anywhere: a real server on 127.0.0.1, real users and permissions, real sweeps through it."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from fashion_sweep import credentials, resume
from fashion_sweep.server import auth_config
from tests.conftest import BIN, QUICK, interruptible, run_script
from tests.test_resume import EPOCH_METRICS, stop_after
from tests.test_ui import free_port, stop_group, wait_until_up

ADMIN = "Adm1n-pw-7d41-c2"  # the first admin's password (MLFLOW_AUTH_ADMIN_PASSWORD)
USERS = {"alice": "alice-pw-5e2b-77", "bob": "bob-pw-91c3-5d0a"}  # alice edits the team's experiment, bob reads it
EXPERIMENT = "fashion-sweep-shared"  # conf/tracking/server.yaml's
SECRET = "Pa55-in-the-URI-3f9a"  # a password a user put in tracking.uri
SMALL = ["tracking=server", "model=mlp", *QUICK, "tracking.log_model=false"]


def as_user(name: str) -> dict[str, str]:
    password = ADMIN if name == "admin" else USERS[name]
    return {credentials.USERNAME_ENV: name, credentials.PASSWORD_ENV: password}


def without_credentials() -> dict[str, str]:
    names = (credentials.USERNAME_ENV, credentials.PASSWORD_ENV, credentials.TOKEN_ENV)
    return {key: value for key, value in os.environ.items() if key not in names}


def script(name: str, *args: str, cwd: Path, user: str | None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**without_credentials(), **(as_user(user) if user else {})}
    return subprocess.run([str(BIN / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if "Warning" not in line and "from starlette" not in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """fashion-sweep-server --auth on a new store; the team's experiment with alice as editor, bob as reader."""
    root = tmp_path_factory.mktemp("auth")
    store, port = root / "store", free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "fashion-sweep-server"), "--auth", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
               str(store / "artifacts")]  # fmt: skip
    env = {**without_credentials(), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN}
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        wait_until_up(f"{url}/health", proc)
        os.environ.update(as_user("admin"))  # MLflow's clients in this test process are the admin
        admin = get_app_client("basic-auth", tracking_uri=url)
        experiment_id = MlflowClient(url).create_experiment(EXPERIMENT)
        for name, password in USERS.items():
            admin.create_user(name, password)
        admin.grant_user_permission("alice", "experiment", experiment_id, "EDIT")
        admin.grant_user_permission("bob", "experiment", experiment_id, "READ")
        yield url, root
    finally:
        for key in as_user("admin"):
            os.environ.pop(key, None)
        stop_group(proc)


def test_the_user_database_is_beside_the_store_and_the_rest_api_asks_for_credentials(server) -> None:
    url, root = server
    assert (root / "store" / "basic_auth.db").is_file() and not (root / "basic_auth.db").exists()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401


def test_without_or_with_wrong_credentials_every_command_is_refused_in_one_line(server, tmp_path: Path) -> None:
    url, _ = server
    sweep = ["--multirun", *SMALL, f"tracking.uri={url}", "optimizer.lr=0.001,0.003", f"hydra.sweep.dir={tmp_path}/m"]
    proc = script("fashion-sweep", *sweep, cwd=tmp_path, user=None)
    assert proc.returncode == 1 and "the server asks for credentials: set MLFLOW_TRACKING_USERNAME" in one_line(proc)
    for name in ("fashion-sweep-compare", "fashion-sweep-resume"):
        proc = script(name, "--tracking-uri", url, cwd=tmp_path, user=None, timeout=120)
        assert proc.returncode == 1 and "the server asks for credentials" in one_line(proc), name
    wrong = {**without_credentials(), credentials.USERNAME_ENV: "alice", credentials.PASSWORD_ENV: "not-hers"}
    proc = subprocess.run([str(BIN / "fashion-sweep"), *SMALL, f"tracking.uri={url}", f"hydra.run.dir={tmp_path}/r"],
                          cwd=tmp_path, env=wrong, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "the server refused the credentials of user 'alice'" in one_line(proc)
    (experiment,) = [e for e in MlflowClient(url).search_experiments() if e.name == EXPERIMENT]
    assert not MlflowClient(url).search_runs([experiment.experiment_id])  # nothing was created


@pytest.fixture(scope="module")
def alices_sweep(server, tmp_path_factory: pytest.TempPathFactory):
    """alice's sweep through the server: Ctrl-C'd in its second job, then resumed; (parent run, output of resume)."""
    url, _ = server
    tmp = tmp_path_factory.mktemp("alice")
    command = [str(BIN / "fashion-sweep"), "--multirun", *SMALL, f"tracking.uri={url}", "trainer.verbose=2",
               "optimizer.lr=0.001,0.003", "trainer.epochs=2", f"hydra.sweep.dir={tmp}/multirun"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=tmp, env={**without_credentials(), **as_user("alice")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=interruptible)  # fmt: skip
    output = stop_after(proc, "val_loss", 3, signal.SIGINT)  # Ctrl-C in the second job's second epoch
    # 130 as Ctrl-C; 1 run in 5 here ended -11 (SIGSEGV while exiting, after the runs were marked KILLED): open, see
    # the note of 2026-12-05; what this test is about is that the sweep resumes whole.
    assert proc.returncode in (130, -signal.SIGSEGV), output
    resumed = script("fashion-sweep-resume", "--tracking-uri", url, cwd=tmp, user="alice")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    client = MlflowClient(url)
    (experiment,) = [e for e in client.search_experiments() if e.name == EXPERIMENT]
    (parent,) = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'")
    return parent, resumed.stdout


def test_an_editor_sweeps_through_the_server_and_resumes_it_after_ctrl_c(server, alices_sweep) -> None:
    url, _ = server
    parent, resumed = alices_sweep
    assert f"continuing sweep {parent.info.run_name!r}" in resumed
    client = MlflowClient(url)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.user"] == "alice"
        for metric in EPOCH_METRICS:
            assert sorted(m.step for m in client.get_metric_history(child.info.run_id, metric)) == [1, 2]


def test_a_changed_password_is_refused_at_once_though_the_server_trusts_verified_ones_for_a_minute(server) -> None:
    url, _ = server
    admin = get_app_client("basic-auth", tracking_uri=url)
    admin.create_user("carol", "carol-pw-old-4e1")

    def searches(password: str) -> int:
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
            headers=credentials.request_headers(
                {credentials.USERNAME_ENV: "carol", credentials.PASSWORD_ENV: password}
            ),
        )
        try:
            return urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as refused:
            return refused.code

    assert [searches("carol-pw-old-4e1") for _ in range(2)] == [200, 200]  # the second from the cache
    admin.update_user_password("carol", "carol-pw-new-9b7")
    assert searches("carol-pw-old-4e1") == 401 and searches("carol-pw-new-9b7") == 200
    admin.delete_user("carol")
    assert searches("carol-pw-new-9b7") == 401


def test_the_auth_settings_trust_a_verified_password_for_the_time_asked(tmp_path: Path) -> None:
    for seconds in (60, 0):
        settings = configparser.ConfigParser()
        path = Path(auth_config("sqlite:///users.db", "READ", seconds))
        settings.read(path)
        path.unlink()
        assert settings.getint("mlflow", "auth_cache_ttl_seconds") == seconds
    proc = subprocess.run([str(BIN / "fashion-sweep-server"), "--auth", "--auth-cache-seconds", "-1"], cwd=tmp_path,
                          env=without_credentials(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--auth-cache-seconds -1: expected 0 or more" in proc.stderr.splitlines()[-1]


def test_a_reader_compares_but_cannot_create_a_run(server, alices_sweep, tmp_path: Path) -> None:
    url, _ = server
    parent, _ = alices_sweep
    client = MlflowClient(url)
    before = len(client.search_runs([parent.info.experiment_id]))
    compared = script("fashion-sweep-compare", "--tracking-uri", url, "--out", str(tmp_path / "report"), cwd=tmp_path,
                      user="bob", timeout=120)  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    assert parent.info.run_id in compared.stdout and (tmp_path / "report" / "summary.csv").is_file()
    refused = script("fashion-sweep", *SMALL, f"tracking.uri={url}", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path,
                     user="bob")  # fmt: skip
    assert refused.returncode == 1 and "user 'bob' lacks the permission" in one_line(refused)
    swept = script("fashion-sweep", "--multirun", *SMALL, f"tracking.uri={url}", "optimizer.lr=0.001,0.003",
                   f"hydra.sweep.dir={tmp_path}/m", cwd=tmp_path, user="bob")  # fmt: skip
    assert swept.returncode == 1 and "user 'bob' lacks the permission" in one_line(swept)
    assert len(client.search_runs([parent.info.experiment_id])) == before


def every_file_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def holding(folders: list[Path], secret: str) -> list[Path]:
    """The files under folders whose bytes contain secret."""
    return [path for folder in folders for path in every_file_under(folder) if secret.encode() in path.read_bytes()]


@pytest.mark.parametrize("multirun", [False, True])
def test_a_password_in_tracking_uri_is_refused_and_written_nowhere(server, tmp_path: Path, multirun: bool) -> None:
    url, root = server
    with_password = url.replace("http://", f"http://alice:{SECRET}@")
    flags = ["--multirun", "optimizer.lr=0.001,0.003"] if multirun else []
    outputs = [f"hydra.run.dir={tmp_path}/out/run", f"hydra.sweep.dir={tmp_path}/out/multirun"]
    proc = script("fashion-sweep", *flags, *SMALL, f"tracking.uri={with_password}", *outputs, cwd=tmp_path, user=None)
    assert proc.returncode == 1
    line = one_line(proc)
    assert "tracking.uri=http://alice:***@127.0.0.1" in line and "MLFLOW_TRACKING_PASSWORD" in line
    assert SECRET not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()  # Hydra wrote no output folder
    assert not holding([root / "store", tmp_path], SECRET)  # the server's store, its artifacts, this folder


def test_a_database_password_is_refused_by_the_app_and_kept_off_the_servers_command_line(tmp_path: Path) -> None:
    from benchmarks.server_load import postgres  # a scratch cluster on 127.0.0.1 (Debian's PostgreSQL)

    with postgres() as uri:
        with_password = uri.replace("postgres@", f"postgres:{SECRET}@")  # the cluster trusts 127.0.0.1: any password
        outputs = [f"hydra.run.dir={tmp_path}/out/run", f"tracking.artifact_location={tmp_path}/artifacts"]
        proc = run_script("fashion-sweep", *SMALL[1:], f"tracking.uri={with_password}", *outputs, cwd=tmp_path)
        assert proc.returncode == 1 and "PGPASSWORD" in one_line(proc) and SECRET not in proc.stdout + proc.stderr
        assert not (tmp_path / "out").exists() and MlflowClient(uri).get_experiment_by_name("fashion-sweep") is None

        port = free_port()
        command = [str(BIN / "fashion-sweep-server"), "--port", str(port), "--workers", "1", "--backend-store-uri",
                   with_password, "--artifacts-destination", str(tmp_path / "served")]  # fmt: skip
        server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)  # fmt: skip
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", server)
            arguments = Path(f"/proc/{server.pid}/cmdline").read_bytes()  # what `ps` shows of the exec'd server
            assert b"mlflow" in arguments and SECRET.encode() not in arguments
        finally:
            stop_group(server)
        printed, _ = server.communicate(timeout=30)
        assert "postgres@127.0.0.1" in printed and SECRET not in printed


def test_the_auth_server_refuses_to_start_without_the_admin_password(tmp_path: Path) -> None:
    env = without_credentials() | {"MLFLOW_AUTH_ADMIN_PASSWORD": ""}
    proc = subprocess.run([str(BIN / "fashion-sweep-server"), "--auth", "--backend-store-uri",
                           f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "--port", str(free_port())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "set MLFLOW_AUTH_ADMIN_PASSWORD in the environment" in one_line(proc)
    assert not (tmp_path / "store" / "basic_auth.db").exists()


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:pw@host:5000", "http://alice:***@host:5000"),
        ("postgresql://mlflow:pw@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        ("mssql://db/mlflow?password=pw&driver=x", "mssql://db/mlflow?password=***&driver=x"),
        ("https://host/api?token=pw", "https://host/api?token=***"),
        ("sqlite:////home/pw/mlflow.db", "sqlite:////home/pw/mlflow.db"),
        ("http://alice@host:5000", "http://alice@host:5000"),
        (
            "postgresql://mlflow@db/mlflow?sslkey=/home/a/client.key",
            "postgresql://mlflow@db/mlflow?sslkey=/home/a/client.key",
        ),
    ],
)
def test_a_secret_in_a_uri_is_found_and_redacted(uri: str, shown: str) -> None:
    assert credentials.redacted(uri) == shown
    assert credentials.has_secret(uri) == (shown != uri)


def test_a_password_moves_from_the_uri_to_where_the_client_reads_it() -> None:
    environ: dict[str, str] = {}
    assert credentials.moved_to_environment("http://bob:pw@host:5000", environ) == "http://host:5000"
    assert environ == {credentials.USERNAME_ENV: "bob", credentials.PASSWORD_ENV: "pw"}
    assert credentials.request_headers(environ) == {"Authorization": "Basic Ym9iOnB3"}  # base64 of bob:pw
    environ = {}
    assert (
        credentials.moved_to_environment("postgresql://mlflow:pw@db:5432/x", environ) == "postgresql://mlflow@db:5432/x"
    )
    assert environ == {"PGPASSWORD": "pw"}


def test_resume_replaces_a_password_an_older_version_recorded_with_the_store_it_reads() -> None:
    recorded = ["tracking=server", "tracking.uri=http://alice:pw@host:5000", "optimizer.lr=0.001"]
    assert resume.without_secrets(recorded, "http://host:5000") == [
        "tracking=server", "tracking.uri=http://host:5000", "optimizer.lr=0.001"
    ]  # fmt: skip
