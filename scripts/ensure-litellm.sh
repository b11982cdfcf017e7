#!/bin/sh
# Make sure the LiteLLM proxy is installed, pinned, in its own virtualenv (.venv-litellm) for the
# gateway test (tests/real/test_gateway_real.py): LiteLLM pins many packages of its own, so it never
# goes into the project's .venv. Idempotent: does nothing when the pinned version is there.
# Offline or without a Python 3.11+ it says why and continues; the gateway test then skips.
#
# The version is the one docker/docker-compose.yml, deploy/base/gateway.yaml and
# docker/Dockerfile.gateway run (tests/deploy/test_deploy.py keeps the four equal). Never 1.82.7
# or 1.82.8: those two releases carried a credential stealer (March 2026) and were withdrawn;
# nothing below 1.84.0 either (the proxy's pre-auth SQL injection CVE-2026-42208 and Host-header
# auth bypass CVE-2026-49468 are fixed from 1.84.0 on).
set -u
LITELLM_VERSION=${LITELLM_VERSION:-1.84.1}
VENV=${LITELLM_VENV:-.venv-litellm}
PYTHON=${PYTHON:-python3}
case "$LITELLM_VERSION" in
    1.82.7|1.82.8) echo "ensure-litellm: refusing LiteLLM $LITELLM_VERSION (compromised release)" >&2
                   exit 1 ;;
esac
if [ -x "$VENV/bin/litellm" ] && [ "$(cat "$VENV/.litellm-version" 2>/dev/null)" = "$LITELLM_VERSION" ]; then
    exit 0
fi
echo "ensure-litellm: installing litellm[proxy]==$LITELLM_VERSION into $VENV ..." >&2
if ! { [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"; }; then
    echo "ensure-litellm: could not make a virtualenv with $PYTHON (the gateway test will be skipped)" >&2
    exit 0
fi
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        "litellm[proxy]==$LITELLM_VERSION"; then
    echo "ensure-litellm: pip could not install litellm[proxy]==$LITELLM_VERSION (offline?);" \
         "the gateway test will be skipped" >&2
    exit 0
fi
echo "$LITELLM_VERSION" > "$VENV/.litellm-version"
echo "ensure-litellm: $("$VENV/bin/litellm" --version 2>/dev/null | tail -1)" >&2
