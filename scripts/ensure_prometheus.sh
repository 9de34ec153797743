#!/usr/bin/env bash
# Makes `prometheus` and `promtool` available for tests/test_prometheus.py.
#
# Already on PATH: nothing to do. Otherwise, as root with apt-get (Debian,
# Ubuntu): install the distribution's `prometheus` package without letting its
# maintainer scripts start a system Prometheus on :9090 (the tests run their own,
# on a free port, with a temporary storage dir). Anything else: exit 1 with the
# reason on stderr, which the test prints when it skips.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "prometheus is not installed and there is no apt-get here;" \
    "install Prometheus (prometheus + promtool on PATH), e.g. 'brew install prometheus'" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "prometheus is not installed and installing it needs root:" \
    "sudo apt-get install --no-install-recommends prometheus" >&2
  exit 1
fi

# policy-rc.d exit 101 = "don't start services" (invoke-rc.d and deb-systemd-invoke
# both honour it). Keep an existing policy; remove only the one we add.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  added_policy=1
fi
cleanup() {
  if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
install() {
  apt-get install -y -q --no-install-recommends prometheus >/dev/null
}
if ! install; then
  # A stale package index is the usual reason; refresh once and retry.
  apt-get update -q >/dev/null
  install
fi

# Belt and braces: if a service manager started a system Prometheus anyway, stop it.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
  systemctl disable prometheus >/dev/null 2>&1 || true
fi

command -v prometheus >/dev/null && command -v promtool >/dev/null
