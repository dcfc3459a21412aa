# Set-up and the everyday commands. Every target installs what it needs first, so each works on a fresh
# Debian machine with Python 3.11 (as root, or with sudo), reaching only the package registries.
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PORT ?= 5000
ARGS ?=  # extra Hydra overrides for `make sweep`, e.g. ARGS="data.train_size=2000 trainer.epochs=1"

.PHONY: sweep test bench lint ui server setup data browser netns postgres clean

sweep: setup data  ## the main job: the learning-rate sweep (experiment=lr_sweep) into ./mlruns
	$(BIN)/fashion-sweep --multirun experiment=lr_sweep $(ARGS)

test: setup data browser netns postgres  ## the whole test suite (real data, real MLflow, real Chromium, a real Ray cluster, a scratch PostgreSQL)
	$(BIN)/python -m pytest

bench: setup data  ## the benchmarks (benchmarks/README.md): ~25 minutes, results in benchmarks/results/
	$(BIN)/python -m benchmarks.run

lint: setup  ## ruff and mypy, as CI runs them
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --explicit-package-bases fashion_sweep benchmarks hydra_plugins

ui: setup  ## the MLflow UI on ./mlruns at http://127.0.0.1:$(PORT)
	$(BIN)/fashion-sweep-ui --port $(PORT)

server: setup  ## fashion-sweep-server (MLflow tracking server, artifacts proxied) on ./mlruns, 127.0.0.1:$(PORT)
	$(BIN)/fashion-sweep-server --port $(PORT)

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@python3 -c "import ensurepip" 2>/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv)
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

data:  ## Fashion-MNIST from Debian's dataset-fashion-mnist, unless it is there already
	@[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist)

netns:  ## unshare and ip (util-linux, iproute2): the Ray test runs in a loopback-only network namespace
	@command -v unshare >/dev/null && command -v ip >/dev/null && command -v ss >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq util-linux iproute2)

postgres:  ## Debian's PostgreSQL binaries: a test starts a scratch cluster on 127.0.0.1 (tests/test_store.py)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)

browser:  ## Debian's Chromium, for the UI test
	@command -v chromium >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

clean:  ## remove the virtual environment and Hydra's output folders (keeps ./mlruns)
	rm -rf $(VENV) outputs multirun reports
