#!/usr/bin/env python3
"""igris's own instructions per forwarded round trip and per accepted connection (callgrind).

Instruction counts are stable on a noisy shared machine where wall-clock is not; they count
igris's user space only (the kernel's TCP work, most of the CPU on loopback, is not in them).
For each backend, with the access log on (as deployed) and off: one worker under
`valgrind --tool=callgrind`, a warm-up, then the counters are zeroed, a workload runs, and
they are dumped:

  rr     64 B round trips on one connection (--round-trips of them)
  churn  connect, 1-byte echo, close, one client thread (--churn-seconds)
  idle   the same churn (access log off) while --idle tunnels are held open: igris's own
         cost per connection must not depend on how many are open

  Benchmarks/instructions.py [--igris PATH] [--output FILE] [--append]

valgrind can't read the release binary's debug info, so a stripped copy runs; counts need
no symbols. Loopback only; every client is bounded in count or time.
"""
import argparse, glob, json, os, resource, subprocess, tempfile, time

from bench import write_section, IGRIS, LOAD, free_port, log, start_server, wait_port
from pressure import hold, stop


def load(args, timeout=600):
    out = subprocess.run([LOAD] + args + ["--json"], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"igris-load {' '.join(args)}: {out.stderr.strip()[:300]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Callgrind:
    """igris under callgrind, its counters zeroed and dumped around each workload."""

    def __init__(self, binary, upstream, backend, access_log):
        self.dir = tempfile.mkdtemp(prefix="igris-callgrind-")
        self.port = free_port()
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.dir}/cg.out", binary, "serve",
               "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream, "--backend", backend, "--workers", "1",
               "--log-level", "info" if access_log else "warning", "--max-connections-per-source", "0"]
        if not access_log:
            cmd.append("--no-access-log")
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port, timeout=120):
            self.stop()
            raise RuntimeError("igris under callgrind did not start")

    def control(self, flag):
        subprocess.run(["callgrind_control", flag, str(self.p.pid)], check=True, capture_output=True, timeout=120)

    def measure(self, workload):
        """Instructions igris ran during `workload()`, and what it returned."""
        self.control("-z")
        result = workload()
        before = set(glob.glob(f"{self.dir}/cg.out*"))
        self.control("-d")
        newest = max(glob.glob(f"{self.dir}/cg.out*"), key=os.path.getmtime)
        with open(newest) as f:
            totals = next(int(l.split()[1]) for l in f if l.startswith("totals:") or l.startswith("summary:"))
        for f in set(glob.glob(f"{self.dir}/cg.out*")) - before:
            os.unlink(f)
        return totals, result

    def stop(self):
        self.p.kill()
        self.p.wait()
        subprocess.run(["rm", "-rf", self.dir])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--igris", default=IGRIS)
    ap.add_argument("--backends", default="io_uring,epoll")
    ap.add_argument("--round-trips", type=int, default=5000)
    ap.add_argument("--churn-seconds", type=float, default=4)
    ap.add_argument("--idle", type=int, default=9000, help="tunnels held open for the idle row (0: no such row)")
    ap.add_argument("--output")
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    stripped = tempfile.NamedTemporaryFile(prefix="igris-stripped-", delete=False).name
    subprocess.run(["strip", "-o", stripped, a.igris], check=True)
    echo, upstream = start_server(["echo", "--threads", "1"])
    rows, idle_rows = [], []
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    try:
        for backend in a.backends.split(","):
            for access_log in (True, False):
                cg = Callgrind(stripped, upstream, backend, access_log)
                try:
                    address = f"127.0.0.1:{cg.port}"
                    load(["rr", "--connect", address, "--count", "200"])
                    load(["churn", "--connect", address, "--connections", "1", "--duration", "1"])
                    rr_ir, _ = cg.measure(lambda: load(["rr", "--connect", address, "--count", str(a.round_trips)]))
                    churn_ir, churn = cg.measure(lambda: load(["churn", "--connect", address, "--connections", "1",
                                                               "--duration", str(a.churn_seconds)]))
                    row = (backend, access_log, rr_ir / a.round_trips, churn_ir / churn["connections"], churn["connections"])
                    log(f"instructions {backend} access log {'on' if access_log else 'off'}: {row[2]:,.0f} per round trip, "
                        f"{row[3]:,.0f} per connection ({row[4]} connections)")
                    rows.append(row)
                finally:
                    cg.stop()
        for backend in a.backends.split(",") if a.idle else []:
            cg = Callgrind(stripped, upstream, backend, False)
            holder = None
            try:
                address = f"127.0.0.1:{cg.port}"
                load(["churn", "--connect", address, "--connections", "1", "--duration", "1"])
                holder = hold(address, a.idle, 600)
                ir, churn = cg.measure(lambda: load(["churn", "--connect", address, "--connections", "1",
                                                     "--duration", str(a.churn_seconds)]))
                idle_rows.append((backend, ir / churn["connections"]))
                log(f"instructions {backend} with {a.idle} idle: {idle_rows[-1][1]:,.0f} per connection")
            finally:
                stop(holder)
                cg.stop()
    finally:
        echo.kill()
        os.unlink(stripped)
    out = [f"## igris's instructions per operation ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
           f"From `Benchmarks/instructions.py`: callgrind, one worker, user space only (the kernel's share is not "
           f"counted); {a.round_trips:,} round trips of 64 B on one connection, and {a.churn_seconds:.0f} s of "
           "connect + 1-byte echo + close from one client thread, counters zeroed after a warm-up.\n",
           "| backend | access log | instructions per round trip | per accepted connection |",
           "|---|---|---|---|"]
    for backend, access_log, rr, conn, _ in rows:
        out.append(f"| {backend} | {'on' if access_log else 'off'} | {rr:,.0f} | {conn:,.0f} |")
    out.append("")
    if idle_rows:
        out.append(f"With {a.idle:,} idle tunnels held open (sources spread over 127.0.0.x), access log off:\n")
        out.append("| backend | per accepted connection, none open | with %s open | ratio |" % f"{a.idle:,}")
        out.append("|---|---|---|---|")
        for backend, ir in idle_rows:
            base = next(r[3] for r in rows if r[0] == backend and not r[1])
            out.append(f"| {backend} | {base:,.0f} | {ir:,.0f} | {ir / base:.2f} |")
        out.append("")
    write_section(a.output, a.append, out)


if __name__ == "__main__":
    main()
