#!/usr/bin/env python3
"""End-to-end benchmark: igris beside HAProxy, nginx stream, microsocks and dante.

Same machine, same run, one target after another, every target with the same worker count:

  forward targets (a fixed upstream):
    direct (no proxy), igris-<io_uring|epoll>-<auto|copy|splice>, haproxy,
    haproxy-splice (option splice-auto), nginx (stream module)
  SOCKS5 targets (the client names the destination; no authentication):
    igris-socks-<io_uring|epoll>, microsocks, dante

Workloads, each repeated --repeat times (tables give min / median):
  bulk1, bulk16   one-way throughput to a sink over 1 and 16 connections (Gbit/s), and the
                  proxy's CPU-seconds per GB forwarded (utime+stime of the whole process tree)
  rr              64-byte request/response over one connection: p50/p90/p99/p99.9 (µs)
  churn           connect, 1-byte echo, close, 4 clients: connections/s
  idle            RSS growth of the proxy's process tree per idle bridged connection while
                  --idle connections are held (once per target)

Writes Benchmarks/RESULTS.md and Benchmarks/results.png (matplotlib, if importable).
Loopback only; every run is bounded by --duration / --count.
"""
import argparse, datetime, json, os, platform, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".build", "release")
LOAD = os.path.join(BIN, "igris-load")
IGRIS = os.path.join(BIN, "igris")
TICK = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))

FORWARD_ALL = ["direct", "igris-io_uring-auto", "igris-io_uring-copy", "igris-io_uring-splice", "igris-io_uring-auto-log",
               "igris-io_uring-auto-poll", "igris-epoll-auto", "igris-epoll-copy", "igris-epoll-splice", "igris-epoll-auto-log", "haproxy", "haproxy-splice", "nginx"]
SOCKS_ALL = ["igris-socks-io_uring", "igris-socks-epoll", "microsocks", "dante"]
FORWARD_QUICK = ["direct", "igris-io_uring-auto", "igris-epoll-auto", "haproxy", "nginx"]
SOCKS_QUICK = ["igris-socks-io_uring", "microsocks", "dante"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# Every client of a benchmark is 127.0.0.1, and the proxies it is compared with have no
# per-source limits: igris's defaults (a quarter of max_connections per source) are off here.
NO_SOURCE_LIMITS = ["--max-connections-per-source", "0", "--max-handshakes", "0", "--max-handshakes-per-source", "0"]


def write_section(path, append, lines):
    """Writes a results section (a list of lines) to `path` (None: nowhere), or after what is
    there with `append`, and prints it."""
    text = "\n".join(lines) + "\n"
    if path:
        with open(path, "a" if append else "w") as f:
            f.write(("\n" if append else "") + text)
        log(f"wrote {path}")
    print(text)


def start_server(args):
    p = subprocess.Popen([LOAD] + args, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    return p, line.split()[-1]


def tree(pid):
    """pid and its live descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_sum(pid, per_process):
    """per_process(pid) summed over the process tree; processes gone meanwhile count 0."""
    total = 0
    for p in tree(pid):
        try:
            total += per_process(p)
        except OSError:
            pass
    return total


def process_cpu(p):
    """utime+stime of a process and of its reaped children, in seconds."""
    with open(f"/proc/{p}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICK


def process_rss_kib(p):
    with open(f"/proc/{p}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_cpu(pid):
    """CPU seconds of the process tree (live processes, plus children already reaped)."""
    return tree_sum(pid, process_cpu)


def tree_rss_kib(pid):
    return tree_sum(pid, process_rss_kib)


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Proxy:
    """A proxy process: forwarding a fresh port to `upstream`, or a SOCKS5 server."""

    def __init__(self, kind, upstream, workers, maxconn=7000, igris=None, extra=(), access_log=False):
        self.kind, self.port = kind, free_port()
        igris_binary = igris or IGRIS
        self.files = []
        self.socks = kind.startswith("igris-socks") or kind in ("microsocks", "dante")
        if kind.startswith("igris-socks"):
            backend = kind.split("-")[2]
            cmd = [igris_binary, "serve", "--socks5", f"127.0.0.1:{self.port}", "--no-auth", "--allow", "127.0.0.0/8",
                   "--backend", backend, "--workers", str(workers), "--log-level", "warning"] + NO_SOURCE_LIMITS
        elif kind.startswith("igris"):
            # igris-BACKEND[-MODE][-log|-poll]; MODE: auto (default), copy, splice, zc (copy + SEND_ZC);
            # -log: the access log on, as deployed (one logfmt line per connection, to /dev/null);
            # -poll: --busy-poll 50us (README: busy polling)
            parts = kind.split("-")
            backend, mode = parts[1], (parts[2] if len(parts) > 2 else "auto")
            access_log = access_log or parts[-1] == "log"
            mode_args = {"auto": ["--splice", "auto"], "copy": ["--splice", "never"],
                     "splice": ["--splice", "always"], "zc": ["--splice", "never", "--send-zc", "16384"]}[mode]
            cmd = [igris_binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream,
                   "--backend", backend, "--workers", str(workers)] + (["--log-level", "info"] if access_log else ["--log-level", "warning", "--no-access-log"]) \
                + mode_args + (["--busy-poll", "50us"] if parts[-1] == "poll" else []) + NO_SOURCE_LIMITS + list(extra)
        elif kind in ("haproxy", "haproxy-splice"):
            # maxconn sizes HAProxy's descriptor needs (2 per connection, plus pipes with
            # splice): 7000 fits the 20,000-descriptor limit and holds the idle test's 5,000.
            cfg = self.config(".cfg", f"""global
    nbthread {workers}
    maxconn {maxconn}
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
            cmd = ["haproxy", "-f", cfg, "-db"]
        elif kind == "nginx":
            prefix = tempfile.mkdtemp(prefix="igris-nginx-")
            self.files.append(prefix)
            cfg = self.config(".conf", f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {workers};
worker_rlimit_nofile 20000;
daemon off;
pid {prefix}/nginx.pid;
error_log stderr error;
events {{ worker_connections 12000; }}
stream {{
    server {{
        listen 127.0.0.1:{self.port};
        proxy_pass {upstream};
        proxy_timeout 1h;
    }}
}}
""")
            cmd = ["nginx", "-p", prefix, "-c", cfg]
        elif kind == "microsocks":
            cmd = ["microsocks", "-i", "127.0.0.1", "-p", str(self.port)]
        elif kind == "dante":
            cfg = self.config(".conf", f"""logoutput: /dev/null
internal: 127.0.0.1 port = {self.port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect udpassociate udpreply }}
""")
            cmd = ["danted", "-f", cfg, "-N", str(workers)]
        else:
            raise ValueError(kind)
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not os.environ.get("BENCH_DEBUG") else None)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError(f"{kind} did not start")
        # the probe connection above must be gone before idle RSS is measured
        time.sleep(0.3)

    def config(self, suffix, text):
        f = tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False)
        f.write(text)
        f.close()
        self.files.append(f.name)
        return f.name

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def route(self, target):
        """igris-load arguments to reach `target` through this proxy."""
        if self.socks:
            return ["--connect", target, "--socks5", self.address]
        return ["--connect", self.address]

    def stop(self):
        self.p.send_signal(signal.SIGINT if self.kind.startswith("igris") else signal.SIGTERM)
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            for pid in tree(self.p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.p.wait()
        for f in self.files:
            shutil.rmtree(f, ignore_errors=True) if os.path.isdir(f) else os.unlink(f)


def load(args, timeout=600):
    out = subprocess.run([LOAD] + args + ["--json"], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"igris-load {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def run_target(t, a, sink_addr, echo_addr, results, rep):
    r = results[t]
    px_factory = (lambda up: None) if t == "direct" else (lambda up: Proxy(t, up, a.workers))
    for conns in (1, 16):
        px = px_factory(sink_addr)
        args = px.route(sink_addr) if px else ["--connect", sink_addr]
        c0 = tree_cpu(px.p.pid) if px else 0
        res = load(["bulk"] + args + ["--connections", str(conns), "--duration", str(a.duration)])
        if px:
            c1 = tree_cpu(px.p.pid)
            px.stop()
            r.setdefault(f"cpu{conns}", []).append((c1 - c0) / (res["bytes"] / 1e9))
        r.setdefault(f"bulk{conns}", []).append(res["gbps"])
    px = px_factory(echo_addr)
    args = px.route(echo_addr) if px else ["--connect", echo_addr]
    res = load(["rr"] + args + ["--size", "64", "--count", str(a.rr_count)])
    for k in ("p50", "p90", "p99", "p999"):
        r.setdefault(k, []).append(res[f"{k}_us"])
    res = load(["churn"] + args + ["--connections", "4", "--duration", str(a.churn_duration)])
    r.setdefault("churn", []).append(res["per_s"])
    if res["failures"]:
        r.setdefault("churn_failures", []).append(res["failures"])
    if px and rep == 0 and a.idle > 0:
        before = tree_rss_kib(px.p.pid)
        h = subprocess.Popen([LOAD, "hold"] + args + ["--connections", str(a.idle), "--hold", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = h.stdout.readline()  # "hold open=N": all bridges up
        during = tree_rss_kib(px.p.pid)
        h.wait(timeout=300)
        if line.startswith("hold open="):
            r["idle_bytes"] = [(during - before) * 1024 / a.idle]
        else:
            r["idle_error"] = h.stderr.read().strip()[:200]
    if px:
        px.stop()


def fmt(vals, f="{:.2f}"):
    if not vals:
        return "—"
    return f"{f.format(min(vals))} / {f.format(statistics.median(vals))}"


def med(r, k):
    v = r.get(k)
    return statistics.median(v) if v else None


def write_results(a, targets, results, started, elapsed, chart):
    lines = []
    w = lines.append
    w("# Benchmark results\n")
    w(f"Written by `{'make bench-quick' if a.quick else 'make bench'}` ({' '.join(sys.argv[1:]) or 'defaults'}) on "
      f"{started:%Y-%m-%d %H:%M} UTC in {elapsed / 60:.1f} min. Loopback, same machine, same run; every proxy with "
      f"{a.workers} workers; {a.repeat} runs of each workload, **min / median**.\n")
    w(f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs, Linux {os.uname().release}")
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    w(f"- igris {rev or '?'} (release build); {version(['haproxy', '-v'])}; {version(['nginx', '-v'])}; "
      f"{version(['danted', '-v'])}; microsocks {version(['dpkg-query', '-W', '-f', '${Version}', 'microsocks'])}")
    w(f"- bulk: {a.duration} s per run; rr: {a.rr_count} round trips of 64 bytes; churn: 4 clients for "
      f"{a.churn_duration} s; idle: {a.idle} connections held (first run only)")
    w("- CPU s/GB: user+system CPU of the proxy's whole process tree per GB forwarded (lower is better); "
      "idle B/conn: the tree's RSS growth per held connection\n")
    if chart:
        w(f"![throughput, CPU per GB, latency and idle memory per target]({chart})\n")
    for title, group in (("Forwarding (fixed upstream)", [t for t in targets if t in FORWARD_ALL]),
                         ("SOCKS5 (client-chosen destination, no auth)", [t for t in targets if t in SOCKS_ALL])):
        if not group:
            continue
        w(f"## {title}\n")
        w("| target | bulk 1 conn Gbit/s | bulk 16 conn Gbit/s | CPU s/GB (1 conn) | CPU s/GB (16) | rr64 p50 µs | p90 µs | p99 µs | p99.9 µs | churn conn/s | idle B/conn |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for t in group:
            r = results[t]
            idle = fmt(r.get("idle_bytes", []), "{:.0f}") if "idle_error" not in r else "failed"
            w(f"| {t} | {fmt(r.get('bulk1', []))} | {fmt(r.get('bulk16', []))} | {fmt(r.get('cpu1', []), '{:.3f}')} | "
              f"{fmt(r.get('cpu16', []), '{:.3f}')} | {fmt(r.get('p50', []), '{:.1f}')} | {fmt(r.get('p90', []), '{:.1f}')} | "
              f"{fmt(r.get('p99', []), '{:.1f}')} | {fmt(r.get('p999', []), '{:.1f}')} | {fmt(r.get('churn', []), '{:.0f}')} | {idle} |")
        w("")
    # Ratios of medians.
    direct = results.get("direct", {})
    refs = [("direct", direct), ("HAProxy", results.get("haproxy", {})), ("microsocks", results.get("microsocks", {})),
            ("dante", results.get("dante", {}))]
    w("## Ratios (medians)\n")
    for t in targets:
        if not t.startswith("igris"):
            continue
        r = results[t]
        parts = []
        for name, ref in refs:
            if not ref or ref is r:
                continue
            socks_ref = name in ("microsocks", "dante")
            if socks_ref != t.startswith("igris-socks"):
                continue
            if med(ref, "bulk1") and med(r, "bulk1"):
                parts.append(f"1-conn throughput {med(r, 'bulk1') / med(ref, 'bulk1'):.2f}× {name}")
            if name != "direct" and med(ref, "cpu16") and med(r, "cpu16"):
                parts.append(f"CPU/GB {med(r, 'cpu16') / med(ref, 'cpu16'):.2f}× {name}")
            if name != "direct" and med(ref, "churn") and med(r, "churn"):
                parts.append(f"conn/s {med(r, 'churn') / med(ref, 'churn'):.2f}× {name}")
            if name == "direct" and med(direct, "p50") and med(r, "p50"):
                parts.append(f"adds {med(r, 'p50') - med(direct, 'p50'):.1f} µs p50")
        if parts:
            w(f"- **{t}**: " + "; ".join(parts))
    failures = [f"{t}: {sum(results[t]['churn_failures'])} churn failures" for t in targets if results[t].get("churn_failures")]
    failures += [f"{t}: idle hold failed ({results[t]['idle_error']})" for t in targets if results[t].get("idle_error")]
    failures += [f"{t}: {e}" for t in targets for e in results[t].get("errors", [])]
    if failures:
        w("\n## Errors seen\n")
        for f in failures:
            w(f"- {f}")
    w("\nNoise: 2 shared vCPUs; the proxy, the load generator and the sink compete for them, so absolute "
      "numbers move ±15% between runs. Compare ratios within one run. Reproduce with `make bench` "
      "(or `make bench-quick`).")
    return "\n".join(lines) + "\n"


def chart(targets, results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not importable: no chart (apt-get install python3-matplotlib)")
        return None
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    panels = [("bulk1", "Gbit/s, 1 connection (higher is better)"), ("cpu16", "CPU s per GB, 16 connections (lower is better)"),
              ("p50", "64-byte round trip p50, µs (lower is better)"), ("idle_bytes", "RSS per idle connection, bytes (lower is better)")]
    for ax, (key, title) in zip(axes.flat, panels):
        names = [t for t in targets if results[t].get(key)]
        values = [statistics.median(results[t][key]) for t in names]
        colors = ["#2a6fbb" if t.startswith("igris") else "#999999" for t in names]
        ax.barh(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        if key in ("idle_bytes", "cpu16"):
            ax.set_xscale("log")  # dante's per-process memory and microsocks' CPU dwarf the rest
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    fig.suptitle("igris (blue) vs direct, HAProxy, nginx, microsocks, dante — loopback, medians", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return os.path.basename(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer targets, shorter runs (make bench-quick, < 3 min)")
    ap.add_argument("--duration", type=float)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rr-count", type=int)
    ap.add_argument("--churn-duration", type=float)
    ap.add_argument("--idle", type=int)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--targets", help="comma-separated subset (default: all, or the quick set)")
    ap.add_argument("--output", help="default: Benchmarks/RESULTS.md (--quick: RESULTS-quick.md, so the committed full run stays)")
    a = ap.parse_args()
    a.output = a.output or os.path.join(HERE, "RESULTS-quick.md" if a.quick else "RESULTS.md")
    a.duration = a.duration or (1.0 if a.quick else 3)
    a.rr_count = a.rr_count or (3000 if a.quick else 20000)
    a.churn_duration = a.churn_duration or (0.7 if a.quick else 2)
    a.idle = a.idle if a.idle is not None else (1000 if a.quick else 5000)
    targets = a.targets.split(",") if a.targets else (FORWARD_QUICK + SOCKS_QUICK if a.quick else FORWARD_ALL + SOCKS_ALL)
    for t, tool in (("haproxy", "haproxy"), ("nginx", "nginx"), ("microsocks", "microsocks"), ("dante", "danted")):
        if not shutil.which(tool):
            log(f"{tool} not installed: its targets are skipped")
            targets = [x for x in targets if not x.startswith(t)]

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.time()
    sink, sink_addr = start_server(["echo", "--sink", "--threads", str(a.workers)])
    echo, echo_addr = start_server(["echo", "--threads", str(a.workers)])
    results = {t: {} for t in targets}
    try:
        for rep in range(a.repeat):
            for t in targets:
                try:
                    run_target(t, a, sink_addr, echo_addr, results, rep)
                except Exception as e:  # one broken peer must not lose the other targets' numbers
                    results[t].setdefault("errors", []).append(str(e)[:200])
                    log(f"{t}: {e}")
                log(f"[{rep + 1}/{a.repeat}] {t} done ({time.time() - t0:.0f} s)")
    finally:
        sink.kill(); echo.kill()
    stem = "results-quick" if a.quick else "results"
    with open(os.path.join(os.path.dirname(a.output), f"{stem}.json"), "w") as f:
        json.dump({"targets": targets, "results": results}, f, indent=1)
    png = chart(targets, results, os.path.join(os.path.dirname(a.output), f"{stem}.png"))
    text = write_results(a, targets, results, started, time.time() - t0, png)
    with open(a.output, "w") as f:
        f.write(text)
    print(text)
    log(f"wrote {a.output}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
