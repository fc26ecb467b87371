#!/usr/bin/env python3
"""Pressure benchmarks: does igris stay predictable as users pile up?

  rate      connection rate (connect, 1-byte echo, close; 8 clients) with 0, 3,000 and 9,000
            idle tunnels open, per backend: the ratio to the rate with none
  slow      a 20-connection ping-pong probe alone, then beside --slow slow readers (each
            pushing 4 MiB into an echo and reading 1 KiB/s back, 16 KiB window) plus 4 bulk
            duplex streams; per backend and splice mode: the probe's ops/s and p99 ratios, and
            the buffer memory igris held
  overload  closed-loop capacity (churn), then open-loop connects at 2x it for --overload-seconds:
            goodput (served/s over capacity), resets, timeouts
  busy      every connection ping-pongs 64 B at once, at 100, 1,000, 4,000 and 9,000
            connections: ops/s, p50/p99/p99.9 (µs), median/slowest per-connection ops, for
            direct, HAProxy, nginx and igris on each backend

  Benchmarks/pressure.py [--sections rate,slow,overload,busy] [--output FILE] [--append]

Loopback only; every client is bounded in time. Machines here are shared and noisy: ratios
come from one run, side by side.
"""
import argparse, ctypes, json, os, shutil, subprocess, sys, time, urllib.request

from bench import write_section, IGRIS, LOAD, Proxy, free_port, log, start_server, tree_cpu, tree_rss_kib, wait_port
from idle_churn import established


def load_json(args, timeout=900):
    out = subprocess.run([LOAD] + args + ["--json"], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"igris-load {' '.join(args)}: {out.stderr.strip()[:300]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def metric(port, name):
    """Sum of a metric's samples on igris's admin endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + "{") or l.startswith(name + " "))


def igris(backend, upstream, workers, splice="auto", binary=None, extra=()):
    admin = free_port()
    px = Proxy(f"igris-{backend}-{ {'auto': 'auto', 'never': 'copy', 'always': 'splice'}[splice] }", upstream, workers,
               igris=binary, extra=["--admin", f"127.0.0.1:{admin}"] + list(extra))
    px.admin = admin
    return px


def hold(address, n, seconds):
    h = subprocess.Popen([LOAD, "hold", "--connect", address, "--connections", str(n), "--hold", str(seconds)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = h.stdout.readline()
    if not line.startswith("hold open="):
        h.kill()
        raise RuntimeError(f"hold {n}: {line.strip()}")
    return h


def time_wait():
    with open("/proc/net/sockstat") as f:
        return int(next(l for l in f if l.startswith("TCP:")).split()[6])


class FreshNetwork:
    """Runs a step in a network namespace of its own (loopback only), so that every step
    starts from the same kernel state: no TIME_WAIT sockets or bound ports left by the steps
    before. Those crowd the ephemeral ports toward the upstream, and the kernel's port search
    in connect() (`__inet_hash_connect`) then costs what the previous step left behind."""

    CLONE_NEWNET = 0x40000000

    def __enter__(self):
        self.original = os.open("/proc/self/ns/net", os.O_RDONLY)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(self.CLONE_NEWNET) != 0:
            os.close(self.original)
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return self

    def __exit__(self, *exc):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(self.original, self.CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns(original network namespace)")
        os.close(self.original)


def user_system(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / 100, int(fields[12]) / 100


def stop(p):
    if p and p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def rate_target(target, upstream, workers, binary, sources):
    """A proxy for the rate section: igris on a backend (BACKEND+sources: connecting from
    `sources` loopback addresses in turn), or HAProxy for reference."""
    if target == "haproxy":
        px = Proxy("haproxy", upstream, workers, maxconn=9800)
        px.admin = None
        return px
    backend, _, variant = target.partition("+")
    extra = [a for i in range(1, sources + 1) for a in ("--upstream-source", f"127.0.0.{i}")] if variant == "sources" else []
    return igris(backend, upstream, workers, binary=binary, extra=extra)


def section_rate(a, echo_addr, out):
    out.append("### Connection rate as idle tunnels accumulate\n")
    out.append("connect + 1-byte echo + close, 8 client threads, %.0f s each; ratio to the rate with no idle tunnel. "
               "Each step runs in a network namespace of its own, so none starts with the TIME_WAIT sockets of "
               "the one before (they fill the ephemeral ports toward the upstream, and connect()'s port search "
               "then costs more on every backend and proxy). `+sources`: igris with `--upstream-source` 127.0.0.1 … 127.0.0.%d, "
               "so its upstream connections spread over that many 4-tuple spaces. HAProxy is the reference.\n" % (a.duration, a.rate_sources))
    out.append("| target | " + " | ".join(f"{n:,} idle" for n in a.idle) + " |")
    out.append("|---|" + "---|" * len(a.idle))
    targets = a.backends + [f"{b}+sources" for b in a.backends if a.rate_sources] + a.rate_references
    for target in targets:
        cells, base = [], None
        for n in a.idle:
            with FreshNetwork():
                echo, fresh = start_server(["echo", "--threads", str(a.workers)])
                px = rate_target(target, fresh, a.workers, a.igris, a.rate_sources)
                h = None
                try:
                    if n:
                        h = hold(px.address, n, a.duration + 120)
                    c0 = tree_cpu(px.p.pid)
                    u0 = user_system(px.p.pid)
                    t0 = time.time()
                    rate = load_json(["churn", "--connect", px.address, "--connections", "8", "--duration", str(a.duration)])["per_s"]
                    pauses = f"{metric(px.admin, 'igris_accept_pauses_total'):.0f} accept pauses, " if px.admin else ""
                    log(f"rate {target} idle {n}: {rate:.0f}/s; used {(tree_cpu(px.p.pid) - c0) / (time.time() - t0):.2f} CPUs, "
                        f"{pauses}user/system {[round(b - a, 2) for a, b in zip(u0, user_system(px.p.pid))]} s, "
                        f"{time_wait()} in TIME_WAIT after")
                    base = base or rate
                    cells.append(f"{rate:,.0f}/s ({rate / base:.2f}x)")
                finally:
                    stop(h)
                    px.stop()
                    echo.kill()
                    echo.wait()
        out.append(f"| {target} | " + " | ".join(cells) + " |")
    out.append("")


def tcp_memory():
    with open("/proc/net/sockstat") as f:
        mem = next(l for l in f if l.startswith("TCP:")).split()[-1]
    with open("/proc/sys/net/ipv4/tcp_mem") as f:
        low, pressure, high = f.read().split()
    return f"{int(mem):,} (pressure {int(pressure):,}, max {int(high):,})"


def probe(address, seconds):
    return load_json(["busy", "--connect", address, "--connections", "20", "--duration", str(seconds)])


def section_slow(a, echo_addr, out):
    out.append("### Slow readers beside a ping-pong probe\n")
    out.append(f"A 20-connection 64 B ping-pong probe ({a.duration:.0f} s) beside 4 bulk duplex streams, then beside the same "
               f"plus {a.slow:,} slow readers ({a.slow // a.workers:,} per worker; each pushes {a.slow_push / 2**20:g} MiB into an echo server and "
               f"reads {a.slow_read_rate} B/s of it back through a 16 KiB window). Ratios: with slow readers over without. Buffer memory: "
               "what igris's pools held in circulation, and buffers lent out, while the slow readers were stalled. "
               "Kernel: TCP memory in pages then (`/proc/net/sockstat`) against tcp_mem's pressure and hard limits.\n")
    out.append("| igris | probe + bulk: ops/s · p99 | + slow readers: ops/s · p99 | ops ratio | p99 ratio | buffer memory (in use) | kernel TCP memory |")
    out.append("|---|---|---|---|---|---|---|")
    for backend in a.backends:
        for splice in ("auto", "always", "never"):
            px = igris(backend, echo_addr, a.workers, splice, binary=a.igris)
            slow = bulk = None
            try:
                bulk = subprocess.Popen([LOAD, "bulk", "--connect", px.address, "--connections", "4", "--duplex",
                                         "--duration", str(a.duration * 4 + 30)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
                alone = probe(px.address, a.duration)
                slow = subprocess.Popen([LOAD, "slow", "--connect", px.address, "--connections", str(a.slow), "--read-rate", str(a.slow_read_rate),
                                         "--push", str(a.slow_push), "--duration", str(a.duration * 3 + 30)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                if not slow.stdout.readline().startswith("slow open="):
                    raise RuntimeError("slow readers did not connect")
                time.sleep(a.duration)  # the slow readers' windows fill, their echoes pile up
                loaded = probe(px.address, a.duration)
                in_use = metric(px.admin, "igris_buffers_in_use")
                held = metric(px.admin, "igris_buffer_memory_bytes")
                ops = loaded["ops_per_s"] / alone["ops_per_s"]
                p99 = loaded["p99_us"] / alone["p99_us"]
                out.append(f"| {backend} {splice} | {alone['ops_per_s']:,.0f} · {alone['p99_us']:,.0f} µs | "
                           f"{loaded['ops_per_s']:,.0f} · {loaded['p99_us']:,.0f} µs | {ops:.2f} | {p99:.2f} | "
                           f"{held / 2**20:.0f} MiB ({in_use:.0f}) | {tcp_memory()} |")
                log(f"slow {backend} {splice}: ops {ops:.2f}x p99 {p99:.2f}x")
            except Exception as e:
                out.append(f"| {backend} {splice} | error: {str(e)[:120]} | | | | |")
            finally:
                stop(bulk)
                stop(slow)
                px.stop()
    out.append("")


def section_overload(a, echo_addr, out):
    out.append("### Open-loop overload\n")
    out.append(f"Capacity: closed-loop churn (8 threads). Then connects at 2x it for {a.overload_seconds:.0f} s, each 64 B "
               "echoed then closed (RST); not served within 2 s: a timeout. Closed: the proxy closed it without an answer. "
               "Goodput: served/s over capacity. `direct` is the echo server alone, for reference.\n")
    out.append("| target | capacity | offered | served/s | goodput | resets | refused | closed | timeouts |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for backend in ["direct"] + a.backends:
        px = None if backend == "direct" else igris(backend, echo_addr, a.workers, binary=a.igris)
        address = px.address if px else echo_addr
        try:
            capacity = load_json(["churn", "--connect", address, "--connections", "8", "--duration", str(a.duration)])["per_s"]
            offered = int(capacity * 2)
            r = load_json(["openloop", "--connect", address, "--rate", str(offered), "--duration", str(a.overload_seconds),
                           "--timeout", "2"])
            out.append(f"| {backend} | {capacity:,.0f}/s | {offered:,}/s | {r['served_per_s']:,.0f} | "
                       f"{r['served_per_s'] / capacity:.2f} | {r['resets']:,} | {r['refused']:,} | {r['closed']:,} | {r['timeouts']:,} |")
            log(f"overload {backend}: {r}")
        finally:
            if px:
                px.stop()
    out.append("")


def section_busy(a, echo_addr, out):
    out.append("### Busy connections\n")
    out.append(f"Every connection ping-pongs 64 B at once for {a.duration:.0f} s (2 client threads). "
               "ops/s · p50 / p99 / p99.9 (ms) · median/slowest per-connection operation count.\n")
    targets = ["direct"] + [t for t in ("haproxy", "nginx") if shutil.which(t)] + [f"igris-{b}" for b in a.backends]
    out.append("| connections | " + " | ".join(targets) + " |")
    out.append("|---|" + "---|" * len(targets))
    for n in a.busy:
        cells = []
        for t in targets:
            px = None
            try:
                if t == "direct":
                    address = echo_addr
                elif t.startswith("igris"):
                    px = igris(t.split("-")[1], echo_addr, a.workers, binary=a.igris)
                    address = px.address
                else:
                    px = Proxy(t, echo_addr, a.workers, maxconn=max(7000, n + 500))
                    address = px.address
                r = load_json(["busy", "--connect", address, "--connections", str(n), "--threads", "2", "--duration", str(a.duration)])
                spread = r["median_over_slowest"]
                cells.append(f"{r['ops_per_s'] / 1000:,.0f}k · {r['p50_us'] / 1000:.1f} / {r['p99_us'] / 1000:.1f} / "
                             f"{r['p999_us'] / 1000:.1f} · " + (f"{spread:.2f}" if spread >= 0 else f"∞ ({r['slowest_ops']} ops)"))
                log(f"busy {n} {t}: {r}")
            except Exception as e:
                cells.append(f"error: {str(e)[:60]}")
            finally:
                if px:
                    px.stop()
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    out.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="rate,slow,overload,busy")
    ap.add_argument("--igris", default=IGRIS, help="the igris binary (to compare builds)")
    ap.add_argument("--backends", default="io_uring,epoll")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--duration", type=float, default=4)
    ap.add_argument("--idle", default="0,3000,9000")
    ap.add_argument("--rate-references", default="haproxy", help="other proxies in the rate section ('' for none)")
    ap.add_argument("--rate-sources", type=int, default=4, help="source addresses of the +sources rows (0: no such rows)")
    ap.add_argument("--slow", type=int, help="slow readers in all (default: 1,000 per worker)")
    ap.add_argument("--slow-push", type=int, default=256 << 10,
                    help="bytes each slow reader pushes into the echo (4 MiB × 2,000 takes the kernel past tcp_mem)")
    ap.add_argument("--slow-read-rate", type=int, default=1024, help="bytes/s each slow reader reads (0: none)")
    ap.add_argument("--overload-seconds", type=float, default=10)
    ap.add_argument("--busy", default="100,1000,4000,9000")
    ap.add_argument("--output")
    ap.add_argument("--append", action="store_true", help="append to --output instead of replacing it")
    a = ap.parse_args()
    a.backends = a.backends.split(",")
    a.idle = [int(x) for x in a.idle.split(",")]
    a.rate_references = [x for x in a.rate_references.split(",") if x]
    a.busy = [int(x) for x in a.busy.split(",")]
    a.slow = a.slow or 1000 * a.workers
    echo, echo_addr = start_server(["echo", "--threads", str(a.workers)])
    out = [f"## Pressure ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {a.workers} workers, `{os.path.basename(a.igris)}`)\n",
           "From `Benchmarks/pressure.py` (see its docstring); one run, ratios within it.\n"]
    try:
        for name in a.sections.split(","):
            {"rate": section_rate, "slow": section_slow, "overload": section_overload, "busy": section_busy}[name](a, echo_addr, out)
    finally:
        echo.kill()
    write_section(a.output, a.append, out)


if __name__ == "__main__":
    main()
