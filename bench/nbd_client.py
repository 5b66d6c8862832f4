#!/usr/bin/python3
"""NBD client benchmark: blockexportd and qemu-storage-daemon as gateways to one NBD server.

One origin server (nbdkit's `file` plugin on a 1 GiB raw image, page-cached; it allows
multi-conn) serves every run. Each gateway opens it with `--blockdev driver=nbd` and exports
the node again over its own NBD server on a unix socket; the clients (nbdcopy, fio's nbd
engine) talk to the gateway. "direct" is the clients on the origin with no gateway: the limit
of this setup. Printed: the median of each measurement over the rounds, its ratio to QSD, and
the gateway's CPU time per GiB or per request (user + system, all threads). Usage:

    cargo build --release -p blockexportd
    bench/nbd_client.py [--rounds 3] [--seconds 5] [--binary target/release/blockexportd]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import cpu_seconds, fio, nbdcopy, stop_server, wait_ready  # noqa: E402


def gateway_command(name, binary, origin_sock, sock):
    prog = binary if name == "blockexportd" else "qemu-storage-daemon"
    return [prog,
            "--blockdev", f"driver=nbd,node-name=r,server.type=unix,server.path={origin_sock},"
                          "export=disk",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=g,node-name=r,name=g,writable=on"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--binary", default="target/release/blockexportd")
    ap.add_argument("--dir", default=None, help="where the image goes (e.g. /dev/shm)")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    for tool in ("nbdcopy", "nbdinfo", "fio", "qemu-storage-daemon", "nbdkit"):
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool}")
    work = tempfile.mkdtemp(prefix="bench-nbd-client-", dir=args.dir)
    image = os.path.join(work, "disk.raw")
    with open(image, "wb") as f:  # real data everywhere: no holes to skip
        chunk = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(chunk)
    origin_sock = os.path.join(work, "origin.sock")
    origin = subprocess.Popen(["nbdkit", "--foreground", "-e", "disk", "-U", origin_sock,
                               "file", image], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    origin_uri = f"nbd+unix:///disk?socket={origin_sock}"
    wait_ready(origin_uri, origin)
    tests = [("seq read, nbdcopy 1 conn (GiB/s)", lambda u: nbdcopy(u, 1)),
             ("4k randread QD32 (IOPS)", lambda u: fio(u, "randread", args.seconds)),
             ("4k randwrite QD32 (IOPS)", lambda u: fio(u, "randwrite", args.seconds))]
    servers = ["blockexportd", "qemu-storage-daemon", "direct"]
    results, cpu = {}, {}
    try:
        for _ in range(args.rounds):
            for server in servers:
                proc = None
                uri = origin_uri
                if server != "direct":
                    sock = os.path.join(work, "gw.sock")
                    if os.path.exists(sock):
                        os.unlink(sock)
                    proc = subprocess.Popen(gateway_command(server, binary, origin_sock, sock),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    uri = f"nbd+unix:///g?socket={sock}"
                    wait_ready(uri, proc)
                try:
                    for name, fn in tests:
                        c0 = cpu_seconds(proc.pid) if proc else 0
                        v = fn(uri)
                        results.setdefault((name, server), []).append(v)
                        if proc:
                            c = cpu_seconds(proc.pid) - c0
                            per = c if "GiB" in name else c / (v * args.seconds) * 1e6
                            cpu.setdefault((name, server), []).append(per)
                finally:
                    if proc:
                        stop_server(proc)
    finally:
        stop_server(origin)
        shutil.rmtree(work)

    print("| test | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for name, _ in tests:
        base = statistics.median(results[(name, "qemu-storage-daemon")])
        cells = []
        for s in servers:
            m = statistics.median(results[(name, s)])
            text = f"{m / 1000:.1f}k" if m >= 1000 else f"{m:.2f}"
            cells.append(text if s == "qemu-storage-daemon" else f"{text} ({m / base:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("gateway CPU: seconds per GiB (nbdcopy), µs per request (fio)")
    print("| test | blockexportd | qemu-storage-daemon |")
    print("|---|---|---|")
    for name, _ in tests:
        cells = [f"{statistics.median(cpu[(name, s)]):.2f}" for s in servers[:2]]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
