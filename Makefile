# `make serve`: install into .venv (first time only) and start the server on the embedded model.
# `make test`:  install into .venv (first time only) and run the whole test suite.
# `make image-test`: build the CPU image with podman and test it in a real container
#                (installs podman if needed; docs/deploy.md, "Building and testing the images here").
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV ?= .venv-vllm
export VLLM_VENV

.PHONY: serve test lint image-test

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/steer serve

# The fast set (tiny models, in-process apps) runs on every core; the tests on the real model
# (marked `real`: real server processes, the embedded model) run after it, one at a time; last,
# the vLLM engine's tests (tests/vllm_plugin) in vLLM's own virtualenv (scripts/ensure-vllm.sh).
test: $(STAMP)
	sh scripts/ensure-browser.sh
	sh scripts/ensure-litellm.sh
	sh scripts/ensure-vllm.sh
	$(VENV)/bin/python -m pytest -q -n auto -m "not real"
	$(VENV)/bin/python -m pytest -q -m real
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_plugin

lint: $(STAMP)
	$(VENV)/bin/ruff check steering server clients tests bench testkit
	$(VENV)/bin/lint-imports

image-test: $(STAMP)
	sh docker/build-image.sh cpu
	$(VENV)/bin/python -m pytest -q -m container tests/deploy/test_container.py
