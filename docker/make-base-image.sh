#!/bin/sh
# Make a Debian bookworm base image with Python 3.11 from Debian's packages alone, for machines
# that cannot pull the usual base (python:3.11-slim-bookworm) from a container registry but do
# reach Debian's package archive. The Dockerfiles stay as they are; point their base at it:
#
#   docker/make-base-image.sh                         # -> localhost/debian-python:3.11-bookworm
#   podman build --build-arg PYTHON_IMAGE=localhost/debian-python:3.11-bookworm -f docker/Dockerfile.cpu .
#   (docker/build-image.sh does both, and the build's package-index set-up; see docs/deploy.md)
#
# mmdebstrap builds a minimal root file system (variant minbase) with python3 (3.11 in bookworm),
# python3-venv, python-is-python3 (so `python` exists, as in the official image) and
# ca-certificates, from the apt sources this machine is configured with (the same archive, incl.
# its security suite; they stay in the image, so `apt-get update` inside a build uses them too).
# The tarball is imported with `podman import` (or `docker import`).
#
# Environment: DEBIAN_SOURCES (an apt sources file; default: this machine's Debian sources, else
# Debian's default mirror), ENGINE (podman or docker; default: podman if installed),
# SOURCE_DATE_EPOCH (for a reproducible tarball). Needs root (or mmdebstrap's unshare mode).
set -eu

TAG=${1:-localhost/debian-python:3.11-bookworm}
SUITE=bookworm
ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}

if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "make-base-image: mmdebstrap is missing (Debian: apt-get install mmdebstrap)" >&2
    exit 1
fi

# The machine's own Debian sources (deb822 or one-line), so the image uses the same archive.
SOURCES=${DEBIAN_SOURCES:-}
if [ -z "$SOURCES" ]; then
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$f" ] && grep -q "$SUITE" "$f"; then SOURCES=$f; break; fi
    done
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
tarball="$work/rootfs.tar"

# Check-Valid-Until off: the machine's archive may be a dated snapshot (kept in the image's
# apt.conf.d, so later `apt-get update` calls in a build accept it as well).
# shellcheck disable=SC2086  # $SOURCES is empty or one path
mmdebstrap --variant=minbase --mode=auto \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "$SUITE" "$tarball" $SOURCES

"$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "Debian $SUITE minbase + python3 (mmdebstrap)" \
    "$tarball" "$TAG" >/dev/null
"$ENGINE" run --rm --network none "$TAG" python -c \
    'import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version'
echo "make-base-image: $TAG ($("$ENGINE" image inspect --format '{{.Size}}' "$TAG") bytes)"
