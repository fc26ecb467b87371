#!/usr/bin/env bash
# Engine figures (throughput, CPU/GB, 64-byte latency, idle RSS) for igris vs direct and
# HAProxy on loopback. Installs HAProxy from apt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v haproxy >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }
# haproxy as a package starts a system service on :80-less default config; stop it quietly.
systemctl stop haproxy 2>/dev/null || service haproxy stop 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
exec python3 Benchmarks/engine_quick.py "$@"
