#!/bin/sh
# `make test`: the whole suite, in the order that keeps CI short on 2 cores.
#
# 1. The browser for the playground's browser test (the fast set needs it).
# 2. The side virtualenvs that only the real tests use (scripts/ensure-*.sh: LiteLLM for the
#    gateway test, and any other listed in SIDE_VENVS) install in the background: mostly
#    downloads, they overlap with
# 3. the fast set (tiny models, in-process apps) on every core, then
# 4. the tests on the real model (marked `real`: real server processes), one at a time — less
#    those marked `clients` (lm-eval, guidellm: `make test-clients`, docs/clients.md).
#
# Exits non-zero if either test set fails; every install's log is printed.
set -u
PY=${PY:-.venv/bin/python}
SIDE_VENVS=${SIDE_VENVS:-"litellm"}
mkdir -p build
sh scripts/ensure-browser.sh
pids=""
for name in $SIDE_VENVS; do
    sh "scripts/ensure-$name.sh" > "build/ensure-$name.log" 2>&1 &
    pids="$pids $!"
done
"$PY" -m pytest -q -n auto -m "not real"
fast=$?
for pid in $pids; do wait "$pid"; done
for name in $SIDE_VENVS; do cat "build/ensure-$name.log" >&2; done
"$PY" -m pytest -q -m "real and not clients" --durations=15
real=$?
[ "$fast" -eq 0 ] && [ "$real" -eq 0 ]
