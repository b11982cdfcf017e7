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

test: $(STAMP)
	sh scripts/ensure-browser.sh
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check steering server clients tests bench testkit
	$(VENV)/bin/lint-imports
