#!/usr/bin/env python3
"""Engine quick benchmark: igris (io_uring, epoll) vs direct vs HAProxy on loopback.

Same machine, same run, one workload after another:
  bulk   one-way throughput to a sink, 1 and 16 connections (Gbit/s) and the proxy's
         CPU-seconds per GB forwarded (utime+stime of the proxy process from /proc)
  rr     64-byte request/response over one connection (p50/p99 latency, µs)
  idle   RSS growth of the proxy per idle bridged connection while 5,000 are held
Each workload runs --repeat times; the table gives min and median.
Loopback only; every run is bounded by --duration / --count.
"""
import argparse, json, os, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".build", "release")
LOAD = os.path.join(BIN, "igris-load")
IGRIS = os.path.join(BIN, "igris")
TICK = os.sysconf("SC_CLK_TCK")


def start_server(args):
    p = subprocess.Popen([LOAD] + args, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    return p, line.split()[-1]


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_port(port, timeout=10):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def free_port():
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Proxy:
    """A proxy process forwarding a fresh port to `upstream`."""
    def __init__(self, kind, upstream, workers):
        self.kind, self.port = kind, free_port()
        self.tmp = None
        if kind.startswith("igris"):
            # igris-BACKEND[-MODE]; MODE: auto (default), copy, splice, zc (copy + SEND_ZC)
            parts = kind.split("-")
            backend, mode = parts[1], (parts[2] if len(parts) > 2 else "auto")
            extra = {"auto": ["--splice", "auto"], "copy": ["--splice", "never"],
                     "splice": ["--splice", "always"], "zc": ["--splice", "never", "--send-zc", "16384"]}[mode]
            cmd = [IGRIS, "serve", "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream,
                   "--backend", backend, "--workers", str(workers), "--log-level", "warning"] + extra
        elif kind in ("haproxy", "haproxy-splice"):
            self.tmp = tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False)
            self.tmp.write(f"""global
    nbthread {workers}
    maxconn 6000
defaults
    mode tcp
{"    option splice-auto" if kind == "haproxy-splice" else ""}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen fwd
    bind 127.0.0.1:{self.port}
    server s1 {upstream}
""")
            self.tmp.close()
            cmd = ["haproxy", "-f", self.tmp.name, "-db"]
        else:
            raise ValueError(kind)
        self.p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        if not wait_port(self.port):
            raise RuntimeError(f"{kind} did not start")
        # the probe connection above must be gone before idle RSS is measured
        time.sleep(0.2)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self.p.send_signal(signal.SIGINT if self.kind.startswith("igris") else signal.SIGTERM)
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill(); self.p.wait()
        if self.tmp:
            os.unlink(self.tmp.name)


def load(args):
    out = subprocess.run([LOAD] + args + ["--json"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rr-count", type=int, default=20000)
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--targets", default="direct,igris-io_uring,igris-epoll,haproxy,haproxy-splice")
    a = ap.parse_args()
    targets = a.targets.split(",")
    if not shutil.which("haproxy"):
        print("haproxy not installed: its targets are skipped (apt-get install haproxy)", file=sys.stderr)
        targets = [t for t in targets if not t.startswith("haproxy")]

    sink, sink_addr = start_server(["echo", "--sink", "--threads", str(a.workers)])
    echo, echo_addr = start_server(["echo", "--threads", str(a.workers)])
    results = {t: {} for t in targets}
    try:
        for rep in range(a.repeat):
            for t in targets:
                r = results[t]
                for conns in (1, 16):
                    if t == "direct":
                        res = load(["bulk", "--connect", sink_addr, "--connections", str(conns), "--duration", str(a.duration)])
                        r.setdefault(f"bulk{conns}", []).append(res["gbps"])
                    else:
                        px = Proxy(t, sink_addr, a.workers)
                        c0 = proc_cpu(px.p.pid)
                        res = load(["bulk", "--connect", px.address, "--connections", str(conns), "--duration", str(a.duration)])
                        c1 = proc_cpu(px.p.pid)
                        px.stop()
                        r.setdefault(f"bulk{conns}", []).append(res["gbps"])
                        r.setdefault(f"cpu{conns}", []).append((c1 - c0) / (res["bytes"] / 1e9))
                target = echo_addr
                px = None if t == "direct" else Proxy(t, echo_addr, a.workers)
                if px:
                    target = px.address
                res = load(["rr", "--connect", target, "--size", "64", "--count", str(a.rr_count)])
                r.setdefault("p50", []).append(res["p50_us"])
                r.setdefault("p99", []).append(res["p99_us"])
                if px and rep == 0:
                    before = proc_rss_kib(px.p.pid)
                    h = subprocess.Popen([LOAD, "hold", "--connect", target, "--connections", str(a.idle), "--hold", "2"],
                                         stdout=subprocess.PIPE, text=True)
                    h.stdout.readline()  # "hold open=N": all bridges up
                    during = proc_rss_kib(px.p.pid)
                    h.wait(timeout=120)
                    r["idle_bytes"] = [(during - before) * 1024 / a.idle]
                if px:
                    px.stop()
                print(f"[{rep + 1}/{a.repeat}] {t} done", file=sys.stderr)
    finally:
        sink.kill(); echo.kill()

    def mm(vals, fmt="{:.2f}"):
        if not vals:
            return "—"
        return f"{fmt.format(min(vals))} / {fmt.format(statistics.median(vals))}"

    direct = results.get("direct", {})
    print(f"\nLoopback, {a.workers} workers, {a.repeat} runs (min / median); kernel {os.uname().release}\n")
    print("| target | bulk 1 conn Gbit/s | bulk 16 conn Gbit/s | CPU s/GB (1 conn) | CPU s/GB (16) | rr64 p50 µs | rr64 p99 µs | idle RSS B/conn |")
    print("|---|---|---|---|---|---|---|---|")
    for t in targets:
        r = results[t]
        print(f"| {t} | {mm(r.get('bulk1', []))} | {mm(r.get('bulk16', []))} | {mm(r.get('cpu1', []), '{:.3f}')} | "
              f"{mm(r.get('cpu16', []), '{:.3f}')} | {mm(r.get('p50', []), '{:.1f}')} | {mm(r.get('p99', []), '{:.1f}')} | "
              f"{mm(r.get('idle_bytes', []), '{:.0f}')} |")
    if direct.get("bulk1"):
        print()
        for t in targets:
            if t == "direct":
                continue
            r = results[t]
            ratio1 = statistics.median(r["bulk1"]) / statistics.median(direct["bulk1"])
            added = statistics.median(r["p50"]) - statistics.median(direct["p50"])
            print(f"- {t}: 1-connection throughput {ratio1:.2f}× direct; added p50 latency {added:.1f} µs")


if __name__ == "__main__":
    main()
