#!/bin/sh
# `make test`: the whole suite, in the order that keeps CI short on 2 cores.
#
# 1. The browser for the playground's browser test (the fast set needs it).
# 2. The side virtualenvs (scripts/ensure-*.sh: LiteLLM for the gateway test, vLLM's CPU build for
#    the vLLM engine's tests, and any other listed in SIDE_VENVS) install in the background:
#    mostly downloads, they overlap with
# 3. the fast set (tiny models, in-process apps) on every core, then
# 4. the tests on the real model (marked `real`: real server processes), one at a time — less
#    those marked `clients` (lm-eval, guidellm: `make test-clients`, docs/clients.md), then
# 5. the vLLM engine's tests (tests/vllm_plugin: equivalence with the native engine, the server
#    over vLLM, tensor parallelism) with .venv-vllm's Python (docs/engine.md).
#
# Exits non-zero if a test set or the vLLM install fails; every install's log is printed.
set -u
PY=${PY:-.venv/bin/python}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
SIDE_VENVS=${SIDE_VENVS:-"litellm vllm"}
mkdir -p build
sh scripts/ensure-browser.sh
pids=""
for name in $SIDE_VENVS; do
    sh "scripts/ensure-$name.sh" > "build/ensure-$name.log" 2>&1 &
    pids="$pids $!"
done
"$PY" -m pytest -q -n auto -m "not real"
fast=$?
installs=0
for pid in $pids; do wait "$pid" || installs=1; done
for name in $SIDE_VENVS; do cat "build/ensure-$name.log" >&2; done
"$PY" -m pytest -q -m "real and not clients" --durations=15
real=$?
vllm=0
case " $SIDE_VENVS " in
    *" vllm "*) "$VLLM_VENV/bin/python" -m pytest -q tests/vllm_plugin --durations=10
                vllm=$? ;;
esac
[ "$fast" -eq 0 ] && [ "$real" -eq 0 ] && [ "$vllm" -eq 0 ] && [ "$installs" -eq 0 ]
