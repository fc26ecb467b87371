#!/usr/bin/env python3
"""What the machine leaves a proxy: the whole system's CPU (every process and softirq, from
/proc/stat) per GB of 1-connection bulk and per connect + 1-byte echo + close, direct and
through each proxy, beside the proxy's own CPU and the cores the run kept busy. On two shared
cores the load generator, the far end and the proxy take turns on the same CPUs, so a
proxied run's rate is at most (cores busy) ÷ (system CPU per unit). `others` is the system's
CPU per unit less the proxy's: what the client, the far end and the kernel spend around it.
`left at 0.8× direct`: the proxy CPU per unit that would still allow 0.8× direct's rate with
direct's cores busy (direct's system CPU ÷ 0.8, less `others`).

  Benchmarks/ceiling.py [--targets direct,igris-io_uring-auto,...] [--repeat 3] [--output FILE --append]
"""
import argparse, os, statistics, time

from bench import Proxy, load, log, start_server, tree_cpu, write_section

TARGETS = ["direct", "igris-io_uring-auto", "igris-epoll-auto", "haproxy"]
TICK = os.sysconf("SC_CLK_TCK")


def system_cpu():
    """Busy CPU seconds of the whole machine so far (every CPU, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def measure(t, up, workload, unit):
    px = None if t == "direct" else Proxy(t, up, 2)
    try:
        args = px.route(up) if px else ["--connect", up]
        p0, s0, w0 = (tree_cpu(px.p.pid) if px else 0.0), system_cpu(), time.monotonic()
        res = load(workload(args))
        p1, s1, w1 = (tree_cpu(px.p.pid) if px else 0.0), system_cpu(), time.monotonic()
    finally:
        if px:
            px.stop()
    units = unit(res)
    # The load's wall time includes igris-load's start (tens of ms): cores busy reads a little low.
    return {"rate": res["gbps"] if "gbps" in res else res["per_s"], "system": (s1 - s0) / units, "proxy": (p1 - p0) / units,
            "cores": (s1 - s0) / (w1 - w0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--output")
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    targets = a.targets.split(",")
    sink, sink_addr = start_server(["echo", "--sink", "--listen", "127.0.0.1:0", "--threads", "2"])
    echo, echo_addr = start_server(["echo", "--listen", "127.0.0.1:0", "--threads", "2"])
    runs = {t: {"bulk": [], "churn": []} for t in targets}
    try:
        for rep in range(a.repeat):
            for t in targets:
                log(f"ceiling {rep + 1}/{a.repeat}: {t}")
                runs[t]["bulk"].append(measure(t, sink_addr, lambda r: ["bulk"] + r + ["--connections", "1", "--duration", "3"],
                                               lambda res: res["bytes"] / 1e9))
                runs[t]["churn"].append(measure(t, echo_addr, lambda r: ["churn"] + r + ["--connections", "4", "--duration", "3"],
                                                lambda res: max(1, res["connections"]) / 1e6))
    finally:
        sink.kill()
        echo.kill()

    def med(t, w, k):
        return statistics.median(r[k] for r in runs[t][w])

    lines = [f"## What the machine leaves a proxy ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "From `Benchmarks/ceiling.py` (see its docstring): medians of "
             f"{a.repeat}; system CPU from /proc/stat (every process and softirq), the proxy's from its process tree; "
             "`others` = system − proxy; `left`: the proxy CPU per unit that 0.8× direct's rate would leave at direct's cores busy.", "",
             "| target | bulk 1 conn Gbit/s | cores busy | system CPU-s/GB | proxy | others | left at 0.8× direct | "
             "conn/s | cores busy | system µs/conn | proxy | others | left at 0.8× direct |", "|---" * 13 + "|"]
    for t in targets:
        row = [t]
        for w in ("bulk", "churn"):
            rate, system, proxy, cores = med(t, w, "rate"), med(t, w, "system"), med(t, w, "proxy"), med(t, w, "cores")
            others = system - proxy
            left = med("direct", w, "system") / 0.8 - others if "direct" in runs and t != "direct" else None
            fmt = "{:.2f}" if w == "bulk" else "{:,.0f}"
            unit = "{:.3f}" if w == "bulk" else "{:.0f}"
            row += [fmt.format(rate), f"{cores:.2f}", unit.format(system), "—" if t == "direct" else unit.format(proxy),
                    unit.format(others), "—" if left is None else unit.format(left)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    print("\n".join(lines))
    if a.output:
        write_section(a.output, a.append, lines)


if __name__ == "__main__":
    main()
