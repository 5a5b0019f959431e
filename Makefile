# labd developer entry points. `make run` and `make test` are the README's quick start.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run sim test lint bench system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# System packages the tests talk to (a real broker, mbpoll as a raw Modbus client).
system-deps:
	@bash .ci/system-deps

# The daemon with the simulated cell, on embedded defaults (API on 127.0.0.1:8470).
run: $(STAMP)
	$(BIN)/labd

# The simulated cell alone (a test bench for drivers, mbpoll, mosquitto_sub, a serial terminal).
sim: $(STAMP)
	$(BIN)/labd-sim --config config/sim-cell.yaml

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
