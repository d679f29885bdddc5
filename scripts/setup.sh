#!/usr/bin/env bash
# Installs everything keepcount needs on a fresh Debian machine, idempotently:
# system packages (apt-get as root, or through sudo) without starting their
# services, then the Python virtualenv in .venv with keepcount and its test
# tools.  Fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages keepcount uses.  redis-server/redis-tools: the peer of
# `keepcount bench` (Redis INCR with appendfsync always).  wrk: the HTTP load
# generator of the node benchmark.  maven: fetches Apache Cassandra from Maven
# Central (scripts/get-cassandra.sh).  etcd, ZooKeeper (with a JRE: the
# machine's JDK, else default-jre-headless), HAProxy and NGINX: the local
# cluster's coordinators and load balancers, started by keepcount itself on
# loopback, never as system services.  chromium (+ chromium-driver), nodejs
# and npm: the live page's browser test (tests/browser drives Debian's
# Chromium with playwright-core; no browser is downloaded).  nftables: the
# network partitions of `keepcount verify` (rules on loopback, per cgroup).
# prometheus: only for its promtool, which the tests run (`promtool check
# metrics`) on every /metrics keepcount serves; its service is never started.
# fuse3 (+ libfuse3-dev, pkg-config): the power-loss tests' filesystem, which
# drops every write not fsynced when the power is "cut".  faketime: the
# verifier's clock nemesis (libfaketime preloaded into node processes).
APT_PACKAGES=(python3 python3-venv python3-pip redis-server redis-tools wrk
              etcd-server etcd-client haproxy nginx zookeeper maven
              chromium chromium-driver nodejs npm nftables prometheus
              fuse3 libfuse3-dev pkg-config faketime)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "setup: need root or sudo to run: $*" >&2; exit 1; fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  case "$pkg" in
    python3) command -v python3 >/dev/null 2>&1 || missing+=("$pkg") ;;
    python3-venv) python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=("$pkg") ;;
    python3-pip) : ;;  # only needed when python3 itself comes from apt
    redis-server) command -v redis-server >/dev/null 2>&1 || missing+=("$pkg") ;;
    redis-tools) command -v redis-benchmark >/dev/null 2>&1 || missing+=("$pkg") ;;
    wrk) command -v wrk >/dev/null 2>&1 || missing+=("$pkg") ;;
    etcd-server) command -v etcd >/dev/null 2>&1 || missing+=("$pkg") ;;
    etcd-client) command -v etcdctl >/dev/null 2>&1 || missing+=("$pkg") ;;
    haproxy) command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=("$pkg") ;;
    nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=("$pkg") ;;
    zookeeper) [ -f /usr/share/java/zookeeper.jar ] || missing+=("$pkg") ;;
    maven) command -v mvn >/dev/null 2>&1 || missing+=("$pkg") ;;
    chromium) [ -x /usr/bin/chromium ] || missing+=("$pkg") ;;
    chromium-driver) command -v chromedriver >/dev/null 2>&1 || missing+=("$pkg") ;;
    nodejs) command -v node >/dev/null 2>&1 || missing+=("$pkg") ;;
    npm) command -v npm >/dev/null 2>&1 || missing+=("$pkg") ;;
    nftables) command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=("$pkg") ;;
    prometheus) command -v promtool >/dev/null 2>&1 || missing+=("$pkg") ;;
    fuse3) command -v fusermount3 >/dev/null 2>&1 || missing+=("$pkg") ;;
    libfuse3-dev) [ -f /usr/include/fuse3/fuse.h ] || missing+=("$pkg") ;;
    pkg-config) command -v pkg-config >/dev/null 2>&1 || missing+=("$pkg") ;;
    faketime) command -v faketime >/dev/null 2>&1 || missing+=("$pkg") ;;
  esac
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  # Never start system services from package scripts: keepcount starts its
  # own servers on loopback with data under a temp dir.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
  fi
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    "${missing[@]}" >/dev/null
fi

# Apache Cassandra 5.0 for the Cassandra store: from Maven Central into
# ~/.cache/keepcount (fast once there; see the script).
scripts/get-cassandra.sh >/dev/null

# The Cloud Bigtable emulator for the Bigtable store's tests: Google's own,
# built from source with `go install` through the Go module proxy into
# ~/.cache/keepcount/bin (needs Go >= 1.26; fast once there; see the script).
scripts/get-bigtable-emulator.sh >/dev/null

# playwright-core for the browser test, from the lock file (re-run when it changes).
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "setup: warning: node $(node --version) is older than 20, which playwright-core" \
       "(tests/browser) needs: the browser test will fail; install Node.js >= 20" >&2
fi
lock_stamp=tests/browser/node_modules/.keepcount-lock
want_lock=$(sha256sum tests/browser/package-lock.json | cut -d' ' -f1)
if [ ! -f "$lock_stamp" ] || [ "$(cat "$lock_stamp")" != "$want_lock" ]; then
  echo "setup: npm ci --prefix tests/browser"
  npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want_lock" >"$lock_stamp"
fi

# The virtualenv, re-synced whenever pyproject.toml changes.
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.keepcount-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing keepcount and its test tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" >"$stamp"
fi
