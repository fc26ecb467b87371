#!/usr/bin/env python3
"""One worker against two, and whether SO_REUSEPORT spreads the load between workers.

For each backend and worker count: bulk over 1 and 16 connections (Gbit/s, igris's CPU-seconds
per GB) and 64 B ping-pong on 100 busy connections (ops/s); with more than one worker, each
worker thread's share of igris's CPU during the ping-pong (from /proc/PID/task/*/stat) and of
its connections (`igris_connections_total` is per listener, so the spread is read from the
threads' CPU, which follows the connections a worker owns).

  Benchmarks/workers.py [--workers 1,2] [--backends io_uring,epoll] [--output FILE] [--append]

Loopback only; every client is bounded in time. The load generator and the sink share the
same two cores: compare within one run.
"""
import argparse, os, time

from bench import write_section, Proxy, load, log, start_server, tree_cpu


def thread_cpu(pid):
    """CPU-seconds of each igris worker thread (named igris-wN)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if name.startswith("igris-w"):
            out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--backends", default="io_uring,epoll")
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--output")
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    sink, sink_addr = start_server(["echo", "--sink", "--threads", "2"])
    echo, echo_addr = start_server(["echo", "--threads", "2"])
    rows = []
    try:
        for backend in a.backends.split(","):
            for workers in [int(w) for w in a.workers.split(",")]:
                row = {"backend": backend, "workers": workers}
                for n in (1, 16):
                    px = Proxy(f"igris-{backend}-auto", sink_addr, workers)
                    try:
                        c0 = tree_cpu(px.p.pid)
                        r = load(["bulk", "--connect", px.address, "--connections", str(n), "--duration", str(a.duration)])
                        row[f"bulk{n}"] = r["gbps"]
                        row[f"cpu{n}"] = (tree_cpu(px.p.pid) - c0) / (r["bytes"] / 1e9)
                    finally:
                        px.stop()
                px = Proxy(f"igris-{backend}-auto", echo_addr, workers)
                try:
                    t0 = thread_cpu(px.p.pid)
                    row["busy"] = load(["busy", "--connect", px.address, "--connections", "100", "--duration", str(a.duration)])["ops_per_s"]
                    t1 = thread_cpu(px.p.pid)
                    used = {k: t1[k] - t0.get(k, 0) for k in t1}
                    total = sum(used.values()) or 1
                    row["shares"] = " / ".join(f"{used[k] / total:.0%}" for k in sorted(used))
                finally:
                    px.stop()
                log(f"workers {row}")
                rows.append(row)
    finally:
        sink.kill(); echo.kill()
    out = [f"## One worker or two ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
           f"From `Benchmarks/workers.py`: splice auto, {a.duration:.0f} s per workload, one run. Worker shares: each "
           "worker thread's part of igris's CPU during the 100-connection ping-pong (SO_REUSEPORT spreads the connections).\n",
           "| backend | workers | bulk 1 conn Gbit/s · CPU s/GB | bulk 16 conn Gbit/s · CPU s/GB | 100 busy conns ops/s | worker shares |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['backend']} | {r['workers']} | {r['bulk1']:.1f} · {r['cpu1']:.2f} | {r['bulk16']:.1f} · {r['cpu16']:.2f} | "
                   f"{r['busy']:,.0f} | {r['shares']} |")
    out.append("")
    write_section(a.output, a.append, out)


if __name__ == "__main__":
    main()
