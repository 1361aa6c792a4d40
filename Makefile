PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint bench stack-up stack-down clean

setup:  ## create .venv and install locdiff with its dev extras
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'

demo:  ## run the whole pipeline on the embedded Blue Marble sample (offline, CPU)
	$(BIN)/locdiff demo

test:  ## the test suite (unit, task, flow and end-to-end)
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .

stack-up:
	$(BIN)/locdiff stack up

stack-down:
	$(BIN)/locdiff stack down

clean:
	rm -rf data .prefect
