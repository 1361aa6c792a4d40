PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# written by `make setup`; older than pyproject.toml (or absent with .venv) = set-up is stale
SETUP_DONE := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1

.PHONY: setup chromium demo test lint bench stack-up stack-down clean

setup:  ## create .venv, install locdiff with its dev extras, and Chromium for the map tests
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(MAKE) --no-print-directory chromium
	touch $(SETUP_DONE)

# `make demo` and `make test` run the set-up first when it is missing or older than pyproject.toml
$(SETUP_DONE): pyproject.toml
	$(MAKE) --no-print-directory setup

chromium:  ## the headless browser the map tests drive (a Debian package; nothing to do when present)
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (apt-get)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { echo "chromium is missing: install it (apt-get install chromium)"; exit 1; }

demo: $(SETUP_DONE)  ## run the whole pipeline on the embedded Blue Marble sample (offline, CPU)
	$(BIN)/locdiff demo

test: $(SETUP_DONE)  ## the test suite (unit, task, flow and end-to-end)
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .

stack-up:
	$(BIN)/locdiff stack up

stack-down:
	$(BIN)/locdiff stack down

clean:
	rm -rf data .prefect
