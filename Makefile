# The two set-up commands: `make run` and `make test`. Both build .venv/ on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean .venv
.venv: $(STAMP)

$(STAMP): pyproject.toml packaging/system-deps.sh
	@bash packaging/system-deps.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[gui,dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/rewind

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check engine app tests bench
	$(BIN)/mypy engine

clean:
	rm -rf $(VENV) build *.egg-info
