#!/usr/bin/env python3
"""A/B two igris builds on the hot paths, alternating runs (the machine is noisy):
64 B ping-pong on 1 and 100 connections, bulk over 1 connection on the copy path, with the
proxy's CPU-seconds per GB, and the connection rate (4 clients) with the access log on.

  Benchmarks/ab.py OLD_IGRIS NEW_IGRIS [--repeat 3] [--backend io_uring] [--old-args ARGS] [--new-args ARGS]

One build against itself with other flags: `ab.py B B --new-args=--direct-descriptors`.
"""
import argparse, shlex, statistics, sys

from bench import Proxy, load, start_server, tree_cpu


def run(binary, backend, sink, echo, duration, extra=()):
    out = {}
    px = Proxy(f"igris-{backend}-copy", sink, 2, igris=binary, extra=extra)
    c0 = tree_cpu(px.p.pid)
    r = load(["bulk", "--connect", px.address, "--connections", "1", "--duration", str(duration)])
    out["bulk Gbit/s"] = r["gbps"]
    out["CPU s/GB"] = (tree_cpu(px.p.pid) - c0) / (r["bytes"] / 1e9)
    px.stop()
    px = Proxy(f"igris-{backend}-copy", echo, 2, igris=binary, extra=extra)
    out["rr p50 µs"] = load(["rr", "--connect", px.address, "--count", "20000"])["p50_us"]
    out["busy100 kops/s"] = load(["busy", "--connect", px.address, "--connections", "100", "--duration", str(duration)])["ops_per_s"] / 1000
    px.stop()
    px = Proxy(f"igris-{backend}-copy", echo, 2, igris=binary, access_log=True, extra=extra)
    c0 = tree_cpu(px.p.pid)
    r = load(["churn", "--connect", px.address, "--connections", "4", "--duration", str(duration)])
    out["churn+log conn/s"] = r["per_s"]
    out["churn+log CPU µs/conn"] = (tree_cpu(px.p.pid) - c0) / r["connections"] * 1e6
    px.stop()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="io_uring")
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--old-args", default="", help="extra igris serve flags for OLD")
    ap.add_argument("--new-args", default="", help="extra igris serve flags for NEW")
    a = ap.parse_args()
    sink, sink_addr = start_server(["echo", "--sink", "--threads", "2"])
    echo, echo_addr = start_server(["echo", "--threads", "2"])
    results = {"old": [], "new": []}
    try:
        for i in range(a.repeat):
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                results[name].append(run(getattr(a, name), a.backend, sink_addr, echo_addr, a.duration,
                                         shlex.split(getattr(a, name + "_args"))))
                print(name, results[name][-1], file=sys.stderr, flush=True)
    finally:
        sink.kill(); echo.kill()
    print(f"| {a.backend} (min / median of {a.repeat}) | old | new | new/old (medians) |")
    print("|---|---|---|---|")
    for k in results["old"][0]:
        o = [r[k] for r in results["old"]]
        n = [r[k] for r in results["new"]]
        print(f"| {k} | {min(o):.2f} / {statistics.median(o):.2f} | {min(n):.2f} / {statistics.median(n):.2f} | "
              f"{statistics.median(n) / statistics.median(o):.2f} |")


if __name__ == "__main__":
    main()
