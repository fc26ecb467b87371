#!/usr/bin/env python3
"""Connection rate through igris while N idle tunnels are open.

The cost of opening and closing a connection must not depend on how many are open.
For each backend and each idle count: an `igris-load echo` upstream, `igris serve` forwarding
to it, `igris-load hold` keeping N idle bridged connections (sources spread over 127.0.0.x),
then `igris-load churn` (connect, 1-byte echo, close) for --duration seconds.

  Benchmarks/idle_churn.py [--igris PATH] [--idle 0,3000,9000] [--backends io_uring,epoll]

Prints one line per (backend, idle) with connections/s and the ratio to the idle=0 rate.
Loopback only; every client loop is bounded in time.
"""
import argparse, json, os, socket, subprocess, sys, time

from bench import ROOT, free_port, wait_port


def established(port):
    """Established connections to 127.0.0.1:port, counted from /proc/net/tcp."""
    hexport = f":{port:04X}"
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(hexport) and fields[3] == "01":
                n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--igris", default=os.path.join(ROOT, ".build", "release", "igris"))
    ap.add_argument("--load", default=os.path.join(ROOT, ".build", "release", "igris-load"))
    ap.add_argument("--idle", default="0,3000,9000")
    ap.add_argument("--backends", default="io_uring,epoll")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    a = ap.parse_args()
    results = []
    for backend in a.backends.split(","):
        base = None
        for idle in [int(x) for x in a.idle.split(",")]:
            echo = subprocess.Popen([a.load, "echo", "--listen", "127.0.0.1:0", "--threads", "2"], stdout=subprocess.PIPE, text=True)
            upstream = echo.stdout.readline().split()[-1]
            port = free_port()
            gw = subprocess.Popen([a.igris, "serve", "--listen", f"127.0.0.1:{port}", "--upstream", upstream, "--backend", backend,
                                   "--workers", str(a.workers), "--no-access-log", "--log-level", "warning",
                                   "--max-connections-per-source", "0"])
            holder = None
            try:
                if not wait_port(port):
                    sys.exit(f"igris did not start on {port}")
                if idle:
                    holder = subprocess.Popen([a.load, "hold", "--connect", f"127.0.0.1:{port}", "--connections", str(idle),
                                               "--hold", str(a.duration + 60)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    end = time.time() + 60
                    while established(port) < idle and time.time() < end:
                        time.sleep(0.2)
                out = subprocess.run([a.load, "churn", "--connect", f"127.0.0.1:{port}", "--connections", str(a.clients),
                                      "--duration", str(a.duration), "--json"], capture_output=True, text=True, timeout=a.duration + 60)
                rate = json.loads(out.stdout)["per_s"]
                base = base or rate
                results.append((backend, idle, rate))
                print(f"{backend:9} idle {idle:6}: {rate:9.0f} conn/s  ({rate / base:.2f}x idle 0)", flush=True)
            finally:
                for p in (holder, gw, echo):
                    if p:
                        p.terminate()
                        try:
                            p.wait(timeout=10)
                        except subprocess.TimeoutExpired:
                            p.kill()
    return results


if __name__ == "__main__":
    main()
