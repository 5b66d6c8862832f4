#!/usr/bin/python3
"""RBD benchmark: an RBD-backed NBD export, blockexportd against qemu-storage-daemon.

Both daemons export the same image of a throwaway one-node Ceph cluster (the tests' cluster:
`ceph-cluster`, a memstore OSD on 127.0.0.1) over a unix socket, one after another in each
round, with the same command line; fio's `rbd` engine (librbd with no daemon in between) runs
the same loads on the image in the same rounds, as the physical limit of this setup. Printed:
medians over the rounds, ratios to QSD and to fio's rbd engine, and the daemons' CPU time per
request (user + system, from /proc, all threads) and peak RSS. Usage:

    cargo build --release -p blockexportd -p blockexportd-tests --bin blockexportd --bin ceph-cluster
    bench/rbd.py [--rounds 3] [--seconds 5] [--size-mib 1024]

Rows: 4 KiB random read and random write at queue depth 32, 1 MiB sequential read at queue
depth 8 (fio, nbd engine for the exports). `--conf PATH` uses a running cluster instead of
starting one (its `client.admin` keyring in the configuration), `--pool`, `--only TEXT`,
`--servers`, `--binary` as in bench/nbd.py.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import cpu_seconds, peak_rss_kib, stop_server, wait_ready  # noqa: E402

MiB = 1 << 20


# name -> (fio rw, block size, queue depth)
LOADS = {
    "4k randread QD32 (IOPS)": ("randread", "4k", 32),
    "4k randwrite QD32 (IOPS)": ("randwrite", "4k", 32),
    "1M seqread QD8 (MiB/s)": ("read", "1M", 8),
}


def fio(engine_args, name, seconds, size_mib, env=None):
    rw, bs, depth = LOADS[name]
    r = subprocess.run(["fio", "--name=b", *engine_args, f"--rw={rw}", f"--bs={bs}",
                        f"--iodepth={depth}", f"--size={size_mib}m", "--time_based",
                        f"--runtime={seconds}", "--norandommap", "--output-format=json"],
                       check=True, capture_output=True, text=True, env=env)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"] if "IOPS" in name else side["bw_bytes"] / MiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--binary", default="target/release/blockexportd")
    ap.add_argument("--cluster", default="target/release/ceph-cluster")
    ap.add_argument("--conf", default=None, help="a running cluster's ceph.conf")
    ap.add_argument("--pool", default="rbd")
    ap.add_argument("--servers", default="blockexportd,qemu-storage-daemon,fio-rbd")
    ap.add_argument("--only", default="", help="run only the rows whose name has this text")
    args = ap.parse_args()
    for tool in ("fio", "nbdinfo", "rbd", "qemu-storage-daemon"):
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool}")
    cluster = None
    conf = args.conf
    if conf is None:
        cluster = subprocess.Popen([os.path.abspath(args.cluster)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        conf = cluster.stdout.readline().strip()
    work = tempfile.mkdtemp(prefix="bench-rbd-")
    try:
        run(args, conf, work)
    finally:
        shutil.rmtree(work)
        if cluster is not None:
            cluster.stdin.close()
            cluster.wait()


def run(args, conf, work):
    image = f"bench-{os.getpid()}"
    spec = f"{args.pool}/{image}"
    env = dict(os.environ, CEPH_CONF=conf)
    subprocess.run(["rbd", "-c", conf, "create", "--size", f"{args.size_mib}M", spec], check=True)
    rbd_engine = ["--ioengine=rbd", "--clientname=admin", f"--pool={args.pool}",
                  f"--rbdname={image}"]
    # Real data everywhere, so that reads reach the OSD's objects.
    subprocess.run(["fio", "--name=fill", *rbd_engine, "--rw=write", "--bs=4M", "--iodepth=8",
                    f"--size={args.size_mib}m", "--output-format=json"],
                   check=True, capture_output=True, env=env)
    servers = args.servers.split(",")
    names = [n for n in LOADS if args.only in n]
    results, cpu = {}, {}
    rss = {s: 0 for s in servers}
    sock = os.path.join(work, "nbd.sock")
    uri = f"nbd+unix:///e?socket={sock}"
    node = f"driver=rbd,node-name=r,conf={conf},pool={args.pool},image={image}"
    for rnd in range(args.rounds):
        for server in servers:
            if server == "fio-rbd":
                for name in names:
                    v = fio(rbd_engine, name, args.seconds, args.size_mib, env)
                    results.setdefault((name, server), []).append(v)
                    print(f"round {rnd + 1} {server:20} {name:28} {v:12.2f}", file=sys.stderr,
                          flush=True)
                continue
            prog = os.path.abspath(args.binary) if server == "blockexportd" else server
            if os.path.exists(sock):
                os.unlink(sock)
            proc = subprocess.Popen([prog, "--blockdev", node, "--nbd-server",
                                     f"addr.type=unix,addr.path={sock}", "--export",
                                     "type=nbd,id=e,node-name=r,name=e,writable=on"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_ready(uri, proc, timeout=60.0)
                for name in names:
                    c0 = cpu_seconds(proc.pid)
                    v = fio(["--ioengine=nbd", f"--uri={uri}"], name, args.seconds,
                            args.size_mib)
                    c = cpu_seconds(proc.pid) - c0
                    requests = v * args.seconds  # 1 MiB per request in the MiB/s row
                    results.setdefault((name, server), []).append(v)
                    cpu.setdefault((name, server), []).append(c * 1e6 / requests)
                    print(f"round {rnd + 1} {server:20} {name:28} {v:12.2f}", file=sys.stderr,
                          flush=True)
                rss[server] = max(rss[server], peak_rss_kib(proc.pid))
            finally:
                stop_server(proc)
    subprocess.run(["rbd", "-c", conf, "rm", "--no-progress", spec], check=True,
                   capture_output=True)
    ref, limit = "qemu-storage-daemon", "fio-rbd"
    print("| test | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for name in names:
        med = {s: statistics.median(results[(name, s)]) for s in servers if (name, s) in results}
        cells = []
        for s in servers:
            m = med.get(s)
            if m is None:
                cells.append("n/a")
                continue
            text = f"{m / 1000:.1f}k" if "IOPS" in name else f"{m:.0f}"
            notes = []
            if s not in (ref, limit) and med.get(ref):
                notes.append(f"{m / med[ref]:.2f}x QSD")
            if s != limit and med.get(limit):
                notes.append(f"{100 * m / med[limit]:.0f}% of librbd")
            if notes:
                text += " (" + ", ".join(notes) + ")"
            cells.append(text)
        print(f"| {name} | " + " | ".join(cells) + " |")
    daemons = [s for s in servers if s != limit]
    print("| peak RSS (MiB) | " + " | ".join(f"{rss[s] / 1024:.1f}" if s in daemons else "n/a"
                                           for s in servers) + " |")
    print()
    print("Server CPU time per request (µs, lower is better):")
    print()
    print("| test | " + " | ".join(daemons) + " |")
    print("|---|" + "---|" * len(daemons))
    for name in names:
        cells = [f"{statistics.median(cpu[(name, s)]):.1f}" if (name, s) in cpu else "n/a"
                 for s in daemons]
        print(f"| {name.split(' (')[0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
