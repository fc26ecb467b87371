#!/usr/bin/env python3
"""Zero-downtime upgrade: hand the listeners to a successor under load.

Per backend and worker-count change: 1,000 tunnels each echoing once a second and a churn
client (8 threads: connect, 1-byte echo, close) run through igris; 2 s in, a successor starts
with --takeover. Reported: how long from the successor's start until it serves and the old
process stopped accepting, churn connections and failures, and the tunnels' echo rounds (they
stay on the old process until its 6 s drain deadline closes them).

  Benchmarks/handoff.py [--output FILE] [--append]

Loopback only; every client is bounded in time.
"""
import argparse, json, os, subprocess, tempfile, time

from bench import write_section, IGRIS, LOAD, free_port, log


def run(backend, old_workers, new_workers, workdir):
    echo = subprocess.Popen([LOAD, "echo", "--listen", "127.0.0.1:0", "--threads", "2"], stdout=subprocess.PIPE, text=True)
    upstream = echo.stdout.readline().split()[-1]
    port, admin = free_port(), free_port()
    handoff = os.path.join(workdir, "handoff.sock")

    def config(name, workers, drain):
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            f.write(f"backend: {backend}\nworkers: {workers}\nmax_connections: 5000\nmax_connections_per_source: 0\nhandoff_socket: {handoff}\n"
                    f"drain_timeout: {drain}\nlog: {{access_log: false}}\nlisteners:\n"
                    f"  - {{name: t, listen: '127.0.0.1:{port}', mode: forward, upstream: '{upstream}'}}\n"
                    f"  - {{name: admin, listen: '127.0.0.1:{admin}', mode: admin}}\n")
        return path

    old = subprocess.Popen([IGRIS, "serve", "-c", config("old.yaml", old_workers, "6s")], stderr=subprocess.PIPE, text=True)
    new = None
    try:
        while "forwarding" not in old.stderr.readline():
            pass
        target = f"127.0.0.1:{port}"
        hold = subprocess.Popen([LOAD, "hold", "--connect", target, "--connections", "1000", "--hold", "10", "--echo-every", "1"],
                                stdout=subprocess.PIPE, text=True)
        hold.stdout.readline()
        churn = subprocess.Popen([LOAD, "churn", "--connect", target, "--connections", "8", "--duration", "6", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(2)
        start = time.monotonic()
        new = subprocess.Popen([IGRIS, "serve", "-c", config("new.yaml", new_workers, "30s"), "--takeover"], stderr=subprocess.PIPE, text=True)
        while True:
            line = new.stderr.readline()
            if "took the listeners over" in line or not line:
                break
        took = time.monotonic() - start
        result = json.loads(churn.stdout.readline())
        held = dict(kv.split("=") for kv in hold.stdout.readline().split()[1:])
        old.wait(timeout=30)
        return took, result, held
    finally:
        for p in (new, old, echo):
            if p and p.poll() is None:
                p.kill()
                p.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="a results file (bench.sh: Benchmarks/RESULTS.md); default: print only")
    parser.add_argument("--append", action="store_true")
    a = parser.parse_args()
    out = [f"## Upgrade under load ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
           "1,000 tunnels echoing once a second plus an 8-thread churn client; a successor takes the listeners over "
           "2 s in (`--takeover`). Hand-off: from the successor's start until it serves and the old process stopped "
           "accepting. The tunnels stay on the old process until its 6 s drain deadline.\n",
           "| backend | workers old → new | hand-off | churn connections | failed | tunnel echoes before the deadline | tunnel errors |",
           "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as workdir:
        for backend in ("io_uring", "epoll"):
            for old_workers, new_workers in ((2, 2), (2, 3), (2, 1)):
                log(f"handoff: {backend} {old_workers} -> {new_workers}")
                took, churn, held = run(backend, old_workers, new_workers, workdir)
                out.append(f"| {backend} | {old_workers} → {new_workers} | {took * 1000:.0f} ms | {churn['connections']:,} | "
                           f"{churn['failures']} | {int(held['echoes']):,} ({held['rounds']} rounds, closed at the deadline: "
                           f"{held['closed_by_peer']}) | {held['errors']} |")
    write_section(a.output, a.append, out)


if __name__ == "__main__":
    main()
