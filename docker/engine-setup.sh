#!/bin/sh
# Make sure podman (with buildah, mmdebstrap and podman-compose) is installed and usable here,
# for docker/build-image.sh, tests/deploy/test_container.py and `make image-test`. Idempotent.
#
#   eval "$(sh docker/engine-setup.sh)"     # may print: export CONTAINERS_CONF=...
#
# Installs Debian's packages when one is missing and this is root with apt-get (like
# scripts/ensure-browser.sh); otherwise says why on stderr and exits 1.
#
# Sandboxed machines (CI here) need two podman settings that a normal host does not:
# - a container may not raise its resource limits above the calling process's hard limits
#   (podman's defaults, nofile=1048576 and nproc=4194304, are higher), so containers get the
#   caller's hard limits (nproc also capped by kernel.pid_max, which podman applies to itself);
# - a "hybrid" cgroup v1 + v2 layout, which crun refuses ("cgroups in hybrid mode not
#   supported"): runc is used there.
# They go into a containers.conf of our own, named by CONTAINERS_CONF (read by podman, buildah
# and so podman-compose); the machine's own configuration files are not changed.
set -eu

packages="podman buildah runc mmdebstrap podman-compose uidmap fuse-overlayfs slirp4netns"
missing=""
for cmd in podman buildah runc mmdebstrap podman-compose; do
    command -v "$cmd" >/dev/null 2>&1 || missing="$missing $cmd"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "engine-setup: missing:$missing; install Debian's $packages" >&2
        exit 1
    fi
    echo "engine-setup: installing Debian's $packages (apt-get)..." >&2
    # shellcheck disable=SC2086
    if ! apt-get update -qq \
       || ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            $packages containernetworking-plugins netavark aardvark-dns catatonit >/dev/null; then
        echo "engine-setup: apt-get could not install podman (offline?)" >&2
        exit 1
    fi
fi

state=${STEER_ENGINE_STATE:-${TMPDIR:-/tmp}/steering-podman}
mkdir -p "$state"
conf="$state/containers.conf"

# Hard limits of this process ("Max open files", "Max processes"), as /proc reports them.
hard() { awk -v name="$1" 'index($0, name) == 1 { print $(NF - 1) }' /proc/self/limits; }
nofile=$(hard "Max open files")
nproc=$(hard "Max processes")
pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=$pid_max
[ "$nproc" -gt "$pid_max" ] && nproc=$pid_max

runtime=""
if grep -q ' /sys/fs/cgroup/unified cgroup2 ' /proc/mounts 2>/dev/null \
   && ! [ -e /sys/fs/cgroup/cgroup.controllers ]; then
    runtime="runc"   # hybrid cgroup v1 + v2
fi

{
    echo "# written by docker/engine-setup.sh"
    echo "[containers]"
    echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    if [ -n "$runtime" ]; then
        echo "[engine]"
        echo "runtime = \"$runtime\""
    fi
} > "$conf.tmp"
mv "$conf.tmp" "$conf"
echo "export CONTAINERS_CONF=$conf"
