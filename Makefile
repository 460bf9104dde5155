# triage-node: the two commands a user needs are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?=

.PHONY: serve test test-long test-tools lint typecheck unit bench-ingest bench-stow bench-infer bench-e2e bench-idle bench-web clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "triage-node needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) || \
		{ echo "could not create $(VENV): on Debian/Ubuntu run 'apt-get install python3-venv'"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install (what `make serve` needs).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	@touch $@

# Test install: the runtime plus the dev and train extras (torch 2.13.0, CPU wheel).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,train]'
	@touch $@

serve: $(VENV)/.installed
	$(BIN)/triage-node $(if $(CONFIG),--config $(CONFIG)) serve

# Real peers the tests talk to, and what the DCMTK transport (dicom.transport = "dcmtk") is
# built with. In CI (CI=true, root) they are installed and started; elsewhere the tests that
# need a missing one skip and name it.
test-tools:
ifeq ($(CI),true)
	@command -v storescu >/dev/null && command -v dciodvfy >/dev/null && \
		test -x /usr/sbin/Orthanc && test -f /usr/share/java/pixelmed.jar && \
		test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so && command -v curl >/dev/null && \
		command -v systemd-analyze >/dev/null && command -v g++ >/dev/null && \
		test -f /usr/include/dcmtk/dcmnet/scpthrd.h && command -v javac >/dev/null && \
		command -v chromium >/dev/null && command -v chromedriver >/dev/null && \
		{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; } || { \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends dcmtk dicom3tools orthanc orthanc-dicomweb pixelmed-apps curl systemd \
			docker-compose chromium chromium-driver g++ libdcmtk-dev default-jdk-headless; }
	@pg_isready -q -h 127.0.0.1 -p 5432 || \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start || true
endif

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# pytest's exit code 5 (no tests collected) fails here like any other failure.
test: $(VENV)/.installed-dev test-tools lint typecheck
	$(BIN)/python -m pytest

# The crash, load and fuzz runs alone (they are part of `make test` too).
test-long: $(VENV)/.installed-dev test-tools
	$(BIN)/python -m pytest -m long -s

unit: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests/unit

bench-ingest: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/ingest.py

bench-stow: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/stow.py

bench-infer: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/infer.py

bench-e2e: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/e2e.py

bench-idle: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/idle.py

bench-web: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/web.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
