#!/usr/bin/env python3
"""More bridges than RLIMIT_NOFILE: igris on io_uring with --direct-descriptors holds N bridges
(2N sockets) opened by `igris-load hold`, each verified by a 1-byte echo when opened and again
after the hold. Reported per N: igris's descriptors, user-space RSS per bridge, the kernel's
slab per bridge (all four sockets: client, igris's two, echo), and the time to open them.
The client and the echo run in processes of their own, each within its own limit; the
upstream connections come from 4 source addresses (one address's ephemeral ports would run
short with the previous step's TIME_WAITs).

  Benchmarks/direct.py [--bridges 15000,19500] [--output FILE --append]
"""
import argparse, os, subprocess, time, urllib.request

from bench import IGRIS, LOAD, free_port, log, start_server, wait_port, write_section


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])


def slab_kib():
    with open("/proc/meminfo") as f:
        return int(next(l for l in f if l.startswith("Slab:")).split()[1])


def metric(port, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(l.split()[-1]) for l in body.splitlines() if l.startswith(name))


def run(n, echo_addr, workers):
    port, admin = free_port(), free_port()
    cmd = [IGRIS, "serve", "--listen", f"127.0.0.1:{port}", "--upstream", echo_addr, "--backend", "io_uring",
           "--workers", str(workers), "--direct-descriptors", "--no-access-log", "--log-level", "warning",
           "--admin", f"127.0.0.1:{admin}", "--max-connections-per-source", "0", "--max-handshakes", "0"]
    for k in range(2, 6):
        cmd += ["--upstream-source", f"127.0.0.{k}"]
    px = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_port(port):
            raise RuntimeError("igris did not start")
        time.sleep(0.3)
        rss0, slab0 = rss_kib(px.pid), slab_kib()
        started = time.monotonic()
        hold = subprocess.Popen([LOAD, "hold", "--connect", f"127.0.0.1:{port}", "--connections", str(n), "--hold", "3"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = hold.stdout.readline()
        opened = time.monotonic() - started
        if not line.startswith("hold open="):
            hold.kill()
            raise RuntimeError(f"hold {n}: {line.strip()}")
        time.sleep(1)
        descriptors = len(os.listdir(f"/proc/{px.pid}/fd"))
        rss, slab = rss_kib(px.pid), slab_kib()
        active, direct = metric(admin, "igris_connections_active"), metric(admin, "igris_direct_bridges_total")
        rest = hold.communicate(timeout=120)[0]
        verified = next((l for l in rest.splitlines() if l.startswith("hold verified=")), "hold verified=?")
        return {"bridges": n, "sockets": 2 * n, "active": int(active), "direct": int(direct), "descriptors": descriptors,
                "limit": int(open(f"/proc/{px.pid}/limits").read().split("Max open files")[1].split()[0]),
                "rss_per_bridge": (rss - rss0) * 1024 / n, "slab_kib_per_bridge": (slab - slab0) / n,
                "open_s": opened, "verified": verified.split("=")[1].split()[0]}
    finally:
        px.terminate()
        px.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bridges", default="15000,19500")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output")
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    echo, echo_addr = start_server(["echo", "--threads", "2"])
    out = [f"## Bridges past RLIMIT_NOFILE ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {a.workers} workers, io_uring `--direct-descriptors`)\n",
           "From `Benchmarks/direct.py`. Verified: bridges that echoed when opened and again after a 3 s hold. "
           "Kernel slab: what /proc/meminfo's Slab grew by, for the client's, igris's two and the echo's sockets together. "
           "Direct bridges count the start-up check's connection too.\n",
           "| bridges | sockets in igris | igris's limit | igris's descriptors | direct bridges | verified | user RSS per bridge | kernel slab per bridge | opened in |",
           "|---|---|---|---|---|---|---|---|---|"]
    try:
        for n in [int(x) for x in a.bridges.split(",")]:
            try:
                r = run(n, echo_addr, a.workers)
                out.append(f"| {n:,} | {r['sockets']:,} | {r['limit']:,} | {r['descriptors']} | {r['direct']:,} | {r['verified']} | "
                           f"{r['rss_per_bridge']:.0f} B | {r['slab_kib_per_bridge']:.1f} KiB | {r['open_s']:.1f} s |")
                log(f"direct {n}: {r}")
            except Exception as e:
                out.append(f"| {n:,} | error: {str(e)[:100]} | | | | | | | |")
    finally:
        echo.kill()
    write_section(a.output, a.append, out + [""])


if __name__ == "__main__":
    main()
