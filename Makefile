# `make serve`: install into .venv (first time only) and start the server on the embedded model.
# `make test`:  install into .venv (first time only) and run the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/steer serve

# The fast set (tiny models, in-process apps) runs on every core; the tests on the real model
# (marked `real`: real server processes, the embedded model) run after it, one at a time.
test: $(STAMP)
	sh scripts/ensure-browser.sh
	$(VENV)/bin/python -m pytest -q -n auto -m "not real"
	$(VENV)/bin/python -m pytest -q -m real

lint: $(STAMP)
	$(VENV)/bin/ruff check steering server clients tests bench testkit
	$(VENV)/bin/lint-imports
