#!/usr/bin/env python3
"""TLS termination benchmark: igris (each backend) against HAProxy `bind … ssl crt`, nginx
stream `listen … ssl`, stunnel4 and `ssh -L`, same machine, same run, every peer at 2 workers.

Each terminates TLS 1.3 (ECDSA P-256 certificate, Tests/fixtures/make-certs.sh) in front of a
plain `igris-load echo` (--sink for bulk). The client is `igris-load --tls` (OpenSSL 3 through
IgrisTLS). `ssh -L` (what IGRIS replaces) carries a plain client through ssh and sshd.
- bulk: `igris-load bulk --tls` for 5 s on 1 and 16 connections; Gbit/s of plaintext, and the
  terminating side's CPU-seconds per GB (for ssh -L: ssh and sshd together).
- handshakes: `igris-load churn --tls` (4 threads, 4 s; connect, handshake, 1-byte echo,
  close), full (`--tls-no-resume`) and resumed (session tickets; the share resumed is shown),
  per second and in the terminator's CPU-milliseconds per connection. On two shared cores the
  client's own handshake work limits the rate, so the CPU per connection is the fairer column.
- idle memory: the terminator's RSS growth with 1,000 idle TLS connections open, per connection.
Every row is repeated (--repeat, default 3); the table gives medians and, for igris, the
min/median of its ratio to HAProxy in the same repetition.
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

from bench import write_section, IGRIS, LOAD, NO_SOURCE_LIMITS, free_port, load, log, start_server, tree, tree_cpu, tree_rss_kib, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["igris-io_uring", "igris-epoll", "haproxy", "nginx", "stunnel4", "ssh"]


class Terminator:
    """A TLS terminator (or ssh -L) on a fresh port, forwarding to `upstream`."""

    def __init__(self, kind, upstream, certs, workdir):
        self.kind, self.port, self.extra = kind, free_port(), []
        cert, key = f"{certs}/server.pem", f"{certs}/server.key"
        host, uport = upstream.rsplit(":", 1)
        if kind.startswith("igris"):
            cmd = [IGRIS, "serve", "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream, "--tls-cert", cert, "--tls-key", key,
                   "--backend", kind.split("-")[1], "--workers", "2", "--log-level", "warning", "--no-access-log"] + NO_SOURCE_LIMITS
        elif kind == "haproxy":
            combined = f"{workdir}/haproxy-{self.port}.pem"
            with open(combined, "w") as f:
                f.write(open(cert).read() + open(key).read())
            cfg = self.config(workdir, "cfg", f"""global
    nbthread 2
    maxconn 7000
    tune.ssl.default-dh-param 2048
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen tls
    bind 127.0.0.1:{self.port} ssl crt {combined}
    server s1 {upstream}
""")
            cmd = ["haproxy", "-f", cfg, "-db"]
        elif kind == "nginx":
            prefix = tempfile.mkdtemp(prefix="igris-nginx-", dir=workdir)
            cfg = self.config(workdir, "conf", f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
worker_rlimit_nofile 20000;
daemon off;
pid {prefix}/nginx.pid;
error_log stderr error;
events {{ worker_connections 12000; }}
stream {{
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;
        proxy_pass {upstream};
        proxy_timeout 1h;
    }}
}}
""")
            cmd = ["nginx", "-p", prefix, "-c", cfg]
        elif kind == "stunnel4":
            cfg = self.config(workdir, "conf", f"""foreground = yes
pid =
debug = 0
[tls]
accept = 127.0.0.1:{self.port}
connect = {upstream}
cert = {cert}
key = {key}
""")
            cmd = ["stunnel4", cfg]
        elif kind == "ssh":
            sshd_port = free_port()
            keys = f"{workdir}/ssh-{self.port}"
            os.makedirs(keys)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{keys}/host"], check=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{keys}/user"], check=True)
            shutil.copy(f"{keys}/user.pub", f"{keys}/authorized_keys")
            os.makedirs("/run/sshd", exist_ok=True)
            cfg = self.config(workdir, "sshd", f"""Port {sshd_port}
ListenAddress 127.0.0.1
HostKey {keys}/host
AuthorizedKeysFile {keys}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
PidFile {keys}/sshd.pid
""")
            self.extra.append(subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if not wait_port(sshd_port):
                raise RuntimeError("sshd did not start")
            cmd = ["ssh", "-N", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                   "-i", f"{keys}/user", "-p", str(sshd_port), "-L", f"127.0.0.1:{self.port}:{host}:{uport}", "root@127.0.0.1"]
        else:
            raise ValueError(kind)
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not os.environ.get("BENCH_DEBUG") else None)
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError(f"{kind} did not start")
        time.sleep(0.3)

    def config(self, workdir, suffix, text):
        path = f"{workdir}/{self.kind}-{self.port}.{suffix}"
        with open(path, "w") as f:
            f.write(text)
        return path

    def cpu(self):
        return tree_cpu(self.p.pid) + sum(tree_cpu(e.pid) for e in self.extra)

    def rss_kib(self):
        return tree_rss_kib(self.p.pid) + sum(tree_rss_kib(e.pid) for e in self.extra)

    def stop(self):
        for proc in [self.p] + self.extra:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                for pid in tree(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                proc.wait()


def tls_args(t, certs):
    return [] if t == "ssh" else ["--tls", "--tls-ca", f"{certs}/ca.pem", "--tls-name", "localhost"]


def measure(t, certs, workdir, sink, echo, seconds):
    row = {}
    for n in (1, 16):
        term = Terminator(t, sink, certs, workdir)
        try:
            before = term.cpu()
            r = load(["bulk", "--connect", f"127.0.0.1:{term.port}", "--connections", str(n), "--duration", str(seconds)] + tls_args(t, certs))
            cpu = term.cpu() - before
            row[f"gbps{n}"] = r["gbps"]
            row[f"cpu{n}"] = cpu / (r["bytes"] / 1e9) if r["bytes"] else float("inf")
        finally:
            term.stop()
    if t == "ssh":
        return row
    term = Terminator(t, echo, certs, workdir)
    try:
        for name, extra in (("full", ["--tls-no-resume"]), ("resumed", [])):
            before = term.cpu()
            r = load(["churn", "--connect", f"127.0.0.1:{term.port}", "--connections", "4", "--duration", "4"] + tls_args(t, certs) + extra)
            row[name] = r["per_s"]
            row[name + "_cpu_ms"] = (term.cpu() - before) * 1000 / r["connections"] if r["connections"] else float("inf")
            if name == "resumed":
                row["resumed_share"] = r["resumed"] / r["connections"] if r["connections"] else 0
        before = term.rss_kib()
        hold = subprocess.Popen([LOAD, "hold", "--connect", f"127.0.0.1:{term.port}", "--connections", "1000", "--hold", "2"] + tls_args(t, certs),
                                stdout=subprocess.PIPE, text=True)
        line = hold.stdout.readline()
        if "open=1000" in line:
            time.sleep(0.5)
            row["idle_kib"] = (term.rss_kib() - before) / 1000
        hold.wait(timeout=120)
    finally:
        term.stop()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="a results file (bench.sh: Benchmarks/RESULTS.md); default: print only")
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--targets", default=",".join(TARGETS))
    a = parser.parse_args()
    targets = a.targets.split(",")
    results = {t: [] for t in targets}
    sink, sink_addr = start_server(["echo", "--sink", "--threads", "2"])
    echo, echo_addr = start_server(["echo", "--threads", "2"])
    try:
        with tempfile.TemporaryDirectory() as workdir:
            certs = f"{workdir}/certs"
            subprocess.run(["/bin/sh", f"{ROOT}/Tests/fixtures/make-certs.sh", certs], check=True)
            for rep in range(a.repeat):
                for t in targets:
                    log(f"tls: {t}, repetition {rep + 1}")
                    results[t].append(measure(t, certs, workdir, sink_addr, echo_addr, a.seconds))
                    log(f"  {results[t][-1]}")
    finally:
        sink.kill()
        echo.kill()

    def med(t, k, f="{:.2f}"):
        vals = [r[k] for r in results[t] if k in r]
        return f.format(statistics.median(vals)) if vals else "—"

    def ratio(t, k, invert=False):
        if "haproxy" not in results or t == "haproxy":
            return ""
        vals = [(h[k] / r[k] if invert else r[k] / h[k]) for r, h in zip(results[t], results["haproxy"]) if k in r and k in h and h[k] and r[k]]
        return f"{min(vals):.2f} / {statistics.median(vals):.2f}" if vals else "—"

    out = [f"## TLS termination ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
           __doc__.split("\n\n", 1)[1].strip() + "\n",
           "| terminator | 1 conn Gbit/s | CPU-s/GB, 1 conn | 16 conns Gbit/s | CPU-s/GB, 16 conns | full handshakes/s · CPU-ms each | resumed handshakes/s · CPU-ms each (share resumed) | RSS per idle TLS connection, KiB |",
           "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        out.append(f"| {t} | {med(t, 'gbps1')} | {med(t, 'cpu1')} | {med(t, 'gbps16')} | {med(t, 'cpu16')} | "
                   f"{med(t, 'full', '{:,.0f}')} · {med(t, 'full_cpu_ms')} | {med(t, 'resumed', '{:,.0f}')} · {med(t, 'resumed_cpu_ms')} "
                   f"({med(t, 'resumed_share')}) | {med(t, 'idle_kib', '{:.1f}')} |")
    if "haproxy" in targets:
        out += ["", "igris ÷ HAProxy in the same repetition (min / median); CPU and memory as HAProxy ÷ igris, so above 1 is better:", "",
                "| igris | 1 conn Gbit/s | CPU/GB, 1 conn | CPU/GB, 16 conns | full handshakes/s | CPU per full handshake | resumed handshakes/s | CPU per resumed | idle memory |",
                "|---|---|---|---|---|---|---|---|---|"]
        for t in targets:
            if t.startswith("igris"):
                out.append(f"| {t} | {ratio(t, 'gbps1')} | {ratio(t, 'cpu1', True)} | {ratio(t, 'cpu16', True)} | {ratio(t, 'full')} | "
                           f"{ratio(t, 'full_cpu_ms', True)} | {ratio(t, 'resumed')} | {ratio(t, 'resumed_cpu_ms', True)} | {ratio(t, 'idle_kib', True)} |")
    write_section(a.output, a.append, out)


if __name__ == "__main__":
    main()
