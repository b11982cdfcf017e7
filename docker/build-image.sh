#!/bin/sh
# Build the server's image with podman on this machine: docker/Dockerfile.cpu (default) or
# docker/Dockerfile.cuda, as the docs' `docker build` would, plus what a machine without a
# container registry needs. Layers are cached: a second run rebuilds only what changed.
#
#   docker/build-image.sh [cpu|cuda|gateway|prometheus] [more `podman build` arguments, e.g. --build-arg BAKE_MODEL=0]
#
# 1. podman is installed and set up if needed (docker/engine-setup.sh).
# 2. The base: the Dockerfile's default (python:3.11-slim-bookworm; nvidia/cuda:... for cuda) if
#    it is present or can be pulled, else a Debian bookworm base made from Debian's packages
#    (docker/make-base-image.sh; made once, reused), passed as PYTHON_IMAGE / CUDA_IMAGE.
#    BASE_IMAGE=<image> picks one yourself.
# 3. Packages: the build uses this machine's network (--network host) and this machine's pip
#    configuration: the effective settings of `pip config list` (its files and PIP_* variables)
#    are written to one pip.conf that is mounted read-only at /etc/pip.conf for the RUN steps,
#    together with every local folder or file those settings name (find-links folders, local
#    file:// indexes, a constraints file, a CA bundle). Nothing of that is copied into a layer.
#    For the cpu image, torch then comes from pip's configuration instead of PyTorch's CPU index
#    (TORCH_INDEX_URL set empty): e.g. a local torch CPU wheel in a find-links folder. The image
#    checks that the torch it got is a CPU build. For cuda, find-links folders holding a "+cpu"
#    torch wheel are left out, so PyPI's CUDA build is the one that matches.
#
# --format docker keeps the HEALTHCHECK (the OCI image format has none).
#
# Environment: TAG (default steering-server:<flavour>), BASE_IMAGE, NICE (default 10: the build
# runs at a lower priority, so a shared machine stays responsive).
set -eu
cd "$(dirname "$0")/.."

flavour=${1:-cpu}
[ $# -gt 0 ] && shift
case "$flavour" in
    cpu)  dockerfile=docker/Dockerfile.cpu;  base_arg=PYTHON_IMAGE
          default_base=docker.io/library/python:3.11-slim-bookworm ;;
    cuda) dockerfile=docker/Dockerfile.cuda; base_arg=CUDA_IMAGE
          default_base=docker.io/nvidia/cuda:13.0.0-base-ubuntu22.04 ;;
    # docker/docker-compose.local.yml's gateway and Prometheus, from PyPI and Debian packages
    gateway) dockerfile=docker/Dockerfile.gateway; base_arg=PYTHON_IMAGE
          default_base=docker.io/library/python:3.11-slim-bookworm ;;
    prometheus) dockerfile=docker/Dockerfile.prometheus; base_arg=DEBIAN_IMAGE
          default_base=docker.io/library/debian:bookworm-slim ;;
    *) echo "usage: $0 [cpu|cuda|gateway|prometheus] [podman build args...]" >&2; exit 2 ;;
esac
case "$flavour" in
    cpu|cuda) TAG=${TAG:-steering-server:$flavour} ;;
    *) TAG=${TAG:-steering-$flavour:local} ;;
esac
local_base=localhost/debian-python:3.11-bookworm

eval "$(sh docker/engine-setup.sh)"
state=$(dirname "$CONTAINERS_CONF")

# --- base image ---------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
    if podman image exists "$default_base" \
       || timeout 120 podman pull -q "$default_base" >/dev/null 2>&1; then
        BASE_IMAGE=$default_base
    else
        echo "build-image: $default_base cannot be pulled; using $local_base (Debian packages)" >&2
        podman image exists "$local_base" || sh docker/make-base-image.sh "$local_base"
        BASE_IMAGE=$local_base
    fi
fi

# --- this machine's pip configuration, for the RUN steps ----------------------------------
# Prints the mount options (one per line) and writes $state/pip.conf.
mounts=$(python3 - "$state/pip.conf" "$flavour" <<'EOF'
import os, re, subprocess, sys
from pathlib import Path
out, flavour = Path(sys.argv[1]), sys.argv[2]
try:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                             capture_output=True, text=True).stdout
except (OSError, subprocess.CalledProcessError):
    listing = ""
settings = {}
for line in listing.splitlines():
    m = re.match(r"^([^.]*)\.([^=]+)=(.*)$", line)
    if not m:
        continue
    section, key, value = m.groups()
    value = value.strip().strip("'\"")
    if section in {"global", "install", ":env:"}:
        settings[key] = value   # `pip config list` lists files first, then PIP_* variables
paths = set()
def local(token):
    path = token[len("file://"):] if token.startswith("file://") else token
    if not path.startswith("/") or not os.path.exists(path):
        return None
    return os.path.dirname(path.rstrip("/")) if path.rstrip("/").endswith("/simple") else path
kept = {}
for key, value in settings.items():
    tokens = []
    for token in value.split():
        path = local(token)
        if path and key == "find-links" and flavour == "cuda" and os.path.isdir(path) \
                and any("+cpu" in name for name in os.listdir(path) if name.startswith("torch-")):
            continue   # a CPU torch there would win over PyPI's CUDA build
        if path:
            paths.add(path)
        tokens.append(token)
    if tokens:
        kept[key] = " ".join(tokens)
out.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(kept.items())))
print(f"-v={out}:/etc/pip.conf:ro")
for path in sorted(paths):
    print(f"-v={path}:{path}:ro")
EOF
)

echo "build-image: $TAG from $dockerfile on $BASE_IMAGE; pip configuration:" >&2
sed 's/^/    /' "$state/pip.conf" >&2

torch_arg=""
[ "$flavour" = cpu ] && torch_arg="--build-arg=TORCH_INDEX_URL="
start=$(date +%s)
# shellcheck disable=SC2086  # $mounts and $torch_arg are lists of single-word options
nice -n "${NICE:-10}" podman build --network host --layers --format docker \
    -f "$dockerfile" -t "$TAG" \
    --build-arg "$base_arg=$BASE_IMAGE" $torch_arg $mounts "$@" .
end=$(date +%s)
size=$(podman image inspect --format '{{.Size}}' "$TAG")
echo "build-image: built $TAG in $((end - start)) s; size $((size / 1000000)) MB" >&2
