# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install the project into it first (about 2-5 minutes the first time).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-slow docs lint clean

$(BIN)/mixres: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(BIN)/mixres

venv: $(BIN)/mixres

demo: venv
	$(BIN)/python -m mixres.demo

test: venv
	$(BIN)/python -m pytest -q -m "not slow" tests mixres

test-slow: venv
	$(BIN)/python -m pytest -q -m slow tests

docs: venv
	$(BIN)/mkdocs build --strict

lint: venv
	$(BIN)/ruff check mixres integrations benchmarks tests

clean:
	rm -rf $(VENV) site build dist *.egg-info
