# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install the project into it first (about 2-5 minutes the first time);
# pip's own output goes to .venv/install.log and is shown only if the install fails.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-slow docs lint clean

$(BIN)/mixres: pyproject.toml
	@echo "installing mixres and its dev extras into $(VENV) (log: $(VENV)/install.log) ..."
	@$(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip 'setuptools>=77' > $(VENV)/install.log 2>&1 || (tail -n 40 $(VENV)/install.log; exit 1)
	@$(BIN)/pip install -q -e '.[dev]' >> $(VENV)/install.log 2>&1 || (tail -n 40 $(VENV)/install.log; exit 1)
	@touch $(BIN)/mixres
	@echo "installed: $$($(BIN)/python -c 'import mixres, torch; print("mixres", mixres.__version__, "torch", torch.__version__)')"

venv: $(BIN)/mixres

demo: venv
	$(BIN)/python -m mixres.demo

test: venv
	$(BIN)/python -m pytest -q -m "not slow" tests mixres

test-slow: venv
	$(BIN)/python -m pytest -q -m slow tests

docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: venv
	$(BIN)/ruff check mixres integrations benchmarks tests scripts

clean:
	rm -rf $(VENV) site build dist *.egg-info
