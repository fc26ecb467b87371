#!/usr/bin/env bash
# End-to-end comparison (see bench.py): igris on each backend and splice setting, its SOCKS5
# listener, HAProxy, nginx stream, microsocks and dante, same machine, same run; then TLS
# termination against HAProxy, nginx, stunnel4 and ssh -L (tls.py), and igris's own
# instructions per round trip and per connection under callgrind (instructions.py), one
# worker against two (workers.py), what the machine leaves a proxy (ceiling.py), and bridges
# past RLIMIT_NOFILE (direct.py). Installs the peers from apt when missing and writes Benchmarks/RESULTS.md + results.png.
# Usage: Benchmarks/bench.sh [--quick] [bench.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v microsocks >/dev/null || need+=(microsocks)
command -v danted >/dev/null || need+=(dante-server)
command -v tinyproxy >/dev/null || need+=(tinyproxy)
command -v stunnel4 >/dev/null || need+=(stunnel4)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v valgrind >/dev/null || need+=(valgrind)
command -v ssh >/dev/null || need+=(openssh-client)
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The packages start system services on default ports; the benchmark runs its own instances.
for s in haproxy nginx danted tinyproxy; do systemctl stop "$s" 2>/dev/null || service "$s" stop 2>/dev/null || true; done
ulimit -n "$(ulimit -Hn)"
/usr/bin/python3 Benchmarks/bench.py "$@"
# The pressure, upgrade, gateway-mode and TLS sections (not for --quick or a --targets subset),
# appended to RESULTS.md.
case " $* " in
  *" --quick "*|*" --targets"*) ;;
  *) /usr/bin/python3 Benchmarks/pressure.py --output Benchmarks/RESULTS.md --append
     /usr/bin/python3 Benchmarks/handoff.py --output Benchmarks/RESULTS.md --append
     /usr/bin/python3 Benchmarks/gateway_modes.py --output Benchmarks/RESULTS.md --append
     /usr/bin/python3 Benchmarks/tls.py --output Benchmarks/RESULTS.md --append
     /usr/bin/python3 Benchmarks/instructions.py --output Benchmarks/RESULTS.md --append
     /usr/bin/python3 Benchmarks/workers.py --output Benchmarks/RESULTS.md --append
     /usr/bin/python3 Benchmarks/ceiling.py --output Benchmarks/RESULTS.md --append
     /usr/bin/python3 Benchmarks/direct.py --output Benchmarks/RESULTS.md --append ;;
esac
