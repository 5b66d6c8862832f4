#!/usr/bin/python3
"""FUSE benchmark: blockexportd's FUSE export side by side with qemu-storage-daemon's.

Both export the same 1 GiB raw image (page-cached) on a regular-file mountpoint, one after
the other in one run, for several rounds; fio runs on the mounted file. Printed: medians and
the ratio to QSD. Usage (as root, /dev/fuse needed):

    cargo build --release -p blockexportd
    bench/fuse.py [--rounds 3] [--seconds 5] [--binary target/release/blockexportd]

`--extra NAME=PATH` adds another blockexportd binary (e.g. an older build), run in the same
rounds and shown with its ratio to QSD.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

JOBS = [
    ("4k randread QD32 libaio direct, 1 job (IOPS)",
     ["--rw=randread", "--bs=4k", "--ioengine=libaio", "--direct=1", "--iodepth=32", "--numjobs=1"]),
    ("4k randread QD32 libaio direct, 4 jobs (IOPS)",
     ["--rw=randread", "--bs=4k", "--ioengine=libaio", "--direct=1", "--iodepth=32", "--numjobs=4"]),
    ("4k randwrite QD32 libaio direct, 1 job (IOPS)",
     ["--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--direct=1", "--iodepth=32", "--numjobs=1"]),
    ("4k randread psync, 1 job (IOPS)",
     ["--rw=randread", "--bs=4k", "--ioengine=psync", "--numjobs=1"]),
    ("1M seq read libaio direct QD8 (GiB/s)",
     ["--rw=read", "--bs=1M", "--ioengine=libaio", "--direct=1", "--iodepth=8", "--numjobs=1"]),
]


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(path, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode(errors='replace')}")
        if mounted(path):
            return
        time.sleep(0.02)  # polling the mount table, not a fixed wait
    raise RuntimeError(f"{path} was never mounted")


def fio(path, args, seconds):
    r = subprocess.run(["fio", "--name=b", f"--filename={path}", "--size=1g", "--time_based",
                        f"--runtime={seconds}", "--norandommap", "--group_reporting",
                        "--output-format=json", *args], check=True, capture_output=True, text=True)
    job = json.loads(r.stdout)["jobs"][0]
    side = "write" if "write" in " ".join(args) else "read"
    if "--bs=1M" in args:
        return job[side]["bw_bytes"] / (1 << 30)
    return job[side]["iops"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--binary", default="target/release/blockexportd")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                    help="another blockexportd binary, shown as 'blockexportd NAME'")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    for tool in ("fio", "qemu-storage-daemon"):
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool}")
    work = tempfile.mkdtemp(prefix="bench-fuse-")
    image = os.path.join(work, "disk.raw")
    with open(image, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(chunk)
    servers = {"blockexportd": binary}
    for e in args.extra:
        label, path = e.split("=", 1)
        servers[f"blockexportd {label}"] = os.path.abspath(path)
    servers["qemu-storage-daemon"] = "qemu-storage-daemon"
    results = {}
    for rnd in range(args.rounds):
        for server, prog in servers.items():
            mnt = os.path.join(work, "mnt")
            open(mnt, "w").close()
            proc = subprocess.Popen(
                [prog, "--blockdev", f"driver=file,filename={image},node-name=f",
                 "--export", f"type=fuse,id=e,node-name=f,mountpoint={mnt},writable=on"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_mounted(mnt, proc)
                for name, jobargs in JOBS:
                    v = fio(mnt, jobargs, args.seconds)
                    results.setdefault((name, server), []).append(v)
                    print(f"round {rnd + 1} {server:20} {name:48} {v:12.2f}", file=sys.stderr, flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    names = list(servers)
    print("| test | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, _ in JOBS:
        qsd = statistics.median(results[(name, "qemu-storage-daemon")])
        fmt = (lambda v: f"{v:.2f}") if "GiB" in name else (lambda v: f"{v / 1000:.1f}k")
        cells = []
        for server in names:
            v = statistics.median(results[(name, server)])
            cells.append(fmt(v) if server == "qemu-storage-daemon" else f"{fmt(v)} ({v / qsd:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
