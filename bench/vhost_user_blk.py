#!/usr/bin/python3
"""vhost-user-blk benchmark: blockexportd side by side with qemu-storage-daemon.

Every server exports the same 1 GiB raw image (page-cached, real data everywhere) over
vhost-user-blk with the same command line (`num-queues=2`), one after another in one run, for
several rounds. The client is bench/vhost-load, a libblkio front end in a process of its own
(no VM): one thread per virtqueue, a fixed number of requests in flight per queue. Printed:
the median of each measurement, its ratio to QSD, mean and p99 latency, each daemon's peak RSS
(VmHWM), and the server's CPU time per request (user + system from /proc/PID/stat, all its
threads, over the load run), which decides the throughput when client and server share the
cores and varies less from run to run. Usage:

    cargo build --release -p blockexportd -p vhost-load
    bench/vhost_user_blk.py [--rounds 3] [--seconds 5] [--dir /dev/shm]

Rows: 4 KiB random read and random write at queue depth 32 per queue, and 1 MiB sequential
read at depth 8 per queue, each with 1 and 2 queues.

`--servers` chooses the servers (e.g. `--servers qemu-storage-daemon` before blockexportd has
the export); `--extra NAME=PATH` adds another blockexportd binary as a server of its own
(e.g. `--extra before=/tmp/old/blockexportd`), to compare two builds in one run; `--only TEXT`
runs the rows whose name has TEXT.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import cpu_seconds, peak_rss_kib, stop_server  # noqa: E402  (bench/nbd.py's helpers)

GiB = 1 << 30
QSD = "qemu-storage-daemon"

# (row name, pattern, block size, depth per queue, queues)
ROWS = [(f"{name}, {q} queue{'s' if q > 1 else ''}", pattern, bs, depth, q)
        for name, pattern, bs, depth in (("4k randread QD32", "randread", "4k", 32),
                                         ("4k randwrite QD32", "randwrite", "4k", 32),
                                         ("1M seqread QD8", "seqread", "1m", 8))
        for q in (1, 2)]


def wait_socket(path, proc, timeout=20.0):
    """Waits until the server accepts on its socket (connect polled, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode(errors='replace')}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.01)  # between connection attempts, not instead of them
    raise RuntimeError(f"{path} never accepted")


def server_command(prog, image, sock):
    return [prog, "--blockdev", f"driver=file,node-name=disk0,filename={image}",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues=2"]


def vhost_load(load, sock, pattern, bs, depth, queues, seconds):
    r = subprocess.run([load, "--socket", sock, "--queues", str(queues), "--pattern", pattern,
                        "--bs", bs, "--depth", str(depth), "--seconds", str(seconds)],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--binary", default="target/release/blockexportd")
    ap.add_argument("--load", default="target/release/vhost-load",
                    help="the vhost-load binary (cargo build --release -p vhost-load)")
    ap.add_argument("--servers", default=f"blockexportd,{QSD}")
    ap.add_argument("--dir", default=None,
                    help="where the image goes (e.g. /dev/shm, so that the host's file system "
                         "does not bound the write rows); the system's temporary directory "
                         "by default")
    ap.add_argument("--only", default="", help="run only the rows whose name has this text")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                    help="another blockexportd binary, shown as 'blockexportd NAME'")
    args = ap.parse_args()
    programs = {"blockexportd": os.path.abspath(args.binary), QSD: QSD}
    extra = []
    for e in args.extra:
        label, path = e.split("=", 1)
        programs[f"blockexportd {label}"] = os.path.abspath(path)
        extra.append(f"blockexportd {label}")
    servers = [s for s in args.servers.split(",") if s]
    servers[1:1] = extra
    for s in servers:
        if s not in programs:
            sys.exit(f"unknown server {s!r} (known: {', '.join(programs)})")
        if not shutil.which(programs[s]):
            sys.exit(f"missing server binary: {programs[s]}")
    load = os.path.abspath(args.load)
    if not os.access(load, os.X_OK):
        sys.exit(f"missing {load}: cargo build --release -p vhost-load")
    rows = [r for r in ROWS if args.only in r[0]]

    work = tempfile.mkdtemp(prefix="bench-vhost-", dir=args.dir)
    image = os.path.join(work, "disk.raw")
    with open(image, "wb") as f:  # real data everywhere: no holes
        chunk = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(chunk)
    results = {}  # (row, server) -> [IOPS]
    mib = {}  # (row, server) -> [MiB/s]
    lat = {}  # (row, server) -> [(mean µs, p99 µs)]
    cpu = {}  # (row, server) -> [server CPU µs per request]
    rss = {s: 0 for s in servers}
    try:
        for rnd in range(args.rounds):
            for server in servers:
                sock = os.path.join(work, "vhost.sock")
                if os.path.exists(sock):
                    os.unlink(sock)
                proc = subprocess.Popen(server_command(programs[server], image, sock),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                try:
                    wait_socket(sock, proc)
                    for name, pattern, bs, depth, queues in rows:
                        c0 = cpu_seconds(proc.pid)
                        r = vhost_load(load, sock, pattern, bs, depth, queues, args.seconds)
                        c = cpu_seconds(proc.pid) - c0
                        key = (name, server)
                        results.setdefault(key, []).append(r["iops"])
                        mib.setdefault(key, []).append(r["mib_s"])
                        lat.setdefault(key, []).append((r["lat_mean_us"], r["lat_p99_us"]))
                        cpu.setdefault(key, []).append(c * 1e6 / max(r["ops"], 1))
                        print(f"round {rnd + 1} {server:24} {name:30} {r['iops']:10.0f} IOPS "
                              f"{r['mib_s']:8.1f} MiB/s  {c * 1e6 / max(r['ops'], 1):6.1f} µs CPU/req",
                              file=sys.stderr, flush=True)
                    rss[server] = max(rss[server], peak_rss_kib(proc.pid))
                finally:
                    stop_server(proc)
    finally:
        shutil.rmtree(work)

    def med(d, key):
        return statistics.median(d[key])

    def cell(name, s, m):
        base = med(results, (name, QSD)) if (name, QSD) in results and s != QSD else None
        if "seqread" in name:
            text = f"{med(mib, (name, s)) / 1024:.2f}"
            if base:
                text += f" ({med(mib, (name, s)) / med(mib, (name, QSD)):.2f}x)"
        else:
            text = f"{m / 1000:.1f}k"
            if base:
                text += f" ({m / base:.2f}x)"
        return text

    print("| test | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for name, *_ in rows:
        unit = "GiB/s" if "seqread" in name else "IOPS"
        cells = [cell(name, s, med(results, (name, s))) for s in servers]
        print(f"| {name} ({unit}) | " + " | ".join(cells) + " |")
    print("| peak RSS (MiB) | " + " | ".join(f"{rss[s] / 1024:.1f}" for s in servers) + " |")
    print()
    print("Latency, mean / p99 (µs, medians over the rounds):")
    print()
    print("| test | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for name, *_ in rows:
        cells = [f"{statistics.median(m for m, _ in lat[(name, s)]):.0f} / "
                 f"{statistics.median(p for _, p in lat[(name, s)]):.0f}" for s in servers]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("Server CPU time per request (µs, lower is better):")
    print()
    print("| test | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for name, *_ in rows:
        cells = [f"{med(cpu, (name, s)):.1f}" for s in servers]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
