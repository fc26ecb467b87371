#!/usr/bin/env python3
"""Gateway modes benchmark: SOCKS5 UDP ASSOCIATE through igris and dante, and plain-HTTP
proxying through igris and tinyproxy, same machine, same run.

UDP: `igris-load udp` keeps 8 datagrams in flight on each of 4 associations to an
`igris-load udp-echo` server for 5 s (64 B and 1,200 B payloads). Reported: datagrams echoed
per second, and the proxy's CPU-seconds per million datagrams relayed (each echo is two: to
the echo server and back).
HTTP: `igris-load http`, 4 threads, one GET per connection (absolute form through the proxy)
to an `igris-load http-origin` answering 1 KiB, for 5 s. Reported: requests per second and the
proxy's CPU-milliseconds per 1,000 requests.
Every row is repeated (--repeat, default 3); the table gives the median and, for igris, the
min/median of its ratio to the peer measured in the same repetition.
"""
import argparse
import os
import statistics
import subprocess
import tempfile
import time

from bench import write_section, IGRIS, LOAD, NO_SOURCE_LIMITS, Proxy, free_port, log, start_server, tree_cpu, wait_port


class HTTPProxy:
    """An HTTP proxy process (igris's HTTP listener or tinyproxy) on a fresh port."""

    def __init__(self, kind, workdir, workers=2):
        self.kind, self.port = kind, free_port()
        if kind.startswith("igris-http-"):
            cmd = [IGRIS, "serve", "--http-connect", f"127.0.0.1:{self.port}", "--no-auth", "--allow", "127.0.0.0/8",
                   "--backend", kind.split("-", 2)[2], "--workers", str(workers), "--log-level", "warning",
                   "--no-access-log"] + NO_SOURCE_LIMITS
        elif kind == "tinyproxy":
            cfg = os.path.join(workdir, f"tinyproxy-{self.port}.conf")
            with open(cfg, "w") as f:
                f.write(f"Port {self.port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 1000\nAllow 127.0.0.1\n"
                        f"LogLevel Critical\nPidFile \"{workdir}/tinyproxy-{self.port}.pid\"\n")
            cmd = ["tinyproxy", "-d", "-c", cfg]
        else:
            raise ValueError(kind)
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError(f"{kind} did not start")

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def measure(make_proxy, client_args):
    """Runs igris-load with client_args against a fresh proxy; returns (its result row, proxy CPU seconds)."""
    proxy = make_proxy()
    try:
        before = tree_cpu(proxy.p.pid)
        args = [a.replace("{proxy}", f"127.0.0.1:{proxy.port}") for a in client_args]
        out = subprocess.run([LOAD] + args, capture_output=True, text=True, timeout=120).stdout.split("\n")
        cpu = tree_cpu(proxy.p.pid) - before
        return dict(zip(out[0].split(), out[1].split())), cpu
    finally:
        proxy.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="a results file (bench.sh: Benchmarks/RESULTS.md); default: print only")
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    a = parser.parse_args()
    udp_targets = ["igris-socks-io_uring", "igris-socks-epoll", "dante"]  # bench.Proxy kinds
    http_targets = ["igris-http-io_uring", "igris-http-epoll", "tinyproxy"]
    udp = {}   # (target, size) -> [(rate, cpu per million)]
    http = {}  # target -> [(rate, cpu ms per 1000)]
    echo, echo_addr = start_server(["udp-echo", "--threads", "2"])
    origin, origin_addr = start_server(["http-origin", "--threads", "2"])
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for rep in range(a.repeat):
                for size in (64, 1200):
                    for t in udp_targets:
                        log(f"udp: {t} {size} B, repetition {rep + 1}")
                        row, cpu = measure(lambda: Proxy(t, None, 2), ["udp", "--socks5", "{proxy}", "--target", echo_addr, "--size", str(size),
                                                        "--threads", "4", "--window", "8", "--seconds", str(a.seconds)])
                        echoed = int(row["echoed"])
                        udp.setdefault((t, size), []).append((int(row["datagrams_per_s"]), cpu / (2 * echoed) * 1e6 if echoed else float("inf"),
                                                              int(row["lost"]), int(row["failed_flows"])))
                for t in http_targets:
                    log(f"http: {t}, repetition {rep + 1}")
                    row, cpu = measure(lambda: HTTPProxy(t, workdir), ["http", "--proxy", "{proxy}", "--target", origin_addr, "--threads", "4",
                                                    "--seconds", str(a.seconds)])
                    ok = int(row["ok"])
                    http.setdefault(t, []).append((int(row["requests_per_s"]), cpu / ok * 1e6 if ok else float("inf"), int(row["failed"])))
    finally:
        echo.kill()
        origin.kill()

    def ratio_text(values):
        return f"{min(values):.2f} / {statistics.median(values):.2f}"

    out = [f"## Gateway modes: UDP ASSOCIATE and plain HTTP ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
           __doc__.split("\n\n", 1)[1].strip() + "\n",
           "| UDP target | payload | datagrams/s (median) | CPU-s per million datagrams | lost | failed associations | "
           "rate ÷ dante (min / median) | CPU per datagram, dante ÷ igris (min / median) |",
           "|---|---|---|---|---|---|---|---|"]
    for size in (64, 1200):
        for t in udp_targets:
            runs = udp[(t, size)]
            peer = udp[("dante", size)]
            rates = [r[0] / p[0] for r, p in zip(runs, peer) if p[0]]
            cpus = [p[1] / r[1] for r, p in zip(runs, peer) if r[1]]
            cells = ["", ""] if t == "dante" else [ratio_text(rates) if rates else "—", ratio_text(cpus) if cpus else "—"]
            out.append(f"| {t} | {size} B | {statistics.median(r[0] for r in runs):,.0f} | {statistics.median(r[1] for r in runs):.2f} | "
                       f"{sum(r[2] for r in runs):,} | {sum(r[3] for r in runs)} | {cells[0]} | {cells[1]} |")
    out += ["", "| HTTP target | requests/s (median) | CPU-ms per 1,000 requests | failed | rate ÷ tinyproxy (min / median) |",
            "|---|---|---|---|---|"]
    for t in http_targets:
        runs = http[t]
        peer = http["tinyproxy"]
        rates = [r[0] / p[0] for r, p in zip(runs, peer) if p[0]]
        out.append(f"| {t} | {statistics.median(r[0] for r in runs):,.0f} | {statistics.median(r[1] for r in runs):.0f} | "
                   f"{sum(r[2] for r in runs)} | {'' if t == 'tinyproxy' else ratio_text(rates)} |")
    write_section(a.output, a.append, out)


if __name__ == "__main__":
    main()
