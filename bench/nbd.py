#!/usr/bin/python3
"""NBD benchmark: blockexportd side by side with qemu-storage-daemon, qemu-nbd and nbdkit.

Every server exports the same 1 GiB raw image (page-cached), one after another in one run,
for several rounds. Printed: the median of each measurement, its ratio to QSD, and each
daemon's peak RSS; then the server's CPU time per GiB or per request (user + system, from
/proc, all its threads), which decides the throughput when client and server share the
cores and varies less from run to run. Usage:

    cargo build --release -p blockexportd
    bench/nbd.py [--rounds 3] [--seconds 5] [--binary target/release/blockexportd]

Rows: sequential read of the whole image with nbdcopy (1 and 4 connections), 4 KiB random
read and random write at queue depth 32 with fio's nbd engine; over a unix socket, TCP, and TLS over a unix socket (certificates
made with certtool, the same for every server). With `--qcow2-transports` (unix by default),
the fio rows again on a fully allocated 1 GiB qcow2 image (the same data, converted with
qemu-img; nbdkit has no qcow2 driver that writes, so it sits those rows out).

`--extra NAME=PATH` adds another blockexportd binary as a server of its own (e.g.
`--extra before=/tmp/old/blockexportd`), to compare two builds in one run.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

GiB = 1 << 30


def wait_ready(uri, proc, timeout=20.0):
    """Waits until a client completes the handshake (not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode(errors='replace')}")
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.02)  # between connection attempts, not instead of them
    raise RuntimeError(f"{uri} never became ready")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name, binaries, image, transport, sock, port, pki, fmt="raw"):
    tls = transport == "tls"
    if name in binaries or name == "qemu-storage-daemon":
        prog = binaries.get(name, "qemu-storage-daemon")
        if transport in ("unix", "tls"):
            addr = f"addr.type=unix,addr.path={sock}"
        else:
            addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
        obj = []
        if tls:
            obj = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki}/server"]
            addr += ",tls-creds=tls0"
        node = ["--blockdev", f"driver=file,filename={image},node-name=f"]
        if fmt == "qcow2":
            node += ["--blockdev", "driver=qcow2,file=f,node-name=q"]
        top = "q" if fmt == "qcow2" else "f"
        return [prog, *obj, *node, "--nbd-server", addr,
                "--export", f"type=nbd,id=e,node-name={top},name=e,writable=on"]
    if name == "qemu-nbd":
        where = ["--socket", sock] if transport in ("unix", "tls") else ["-b", "127.0.0.1", "-p", str(port)]
        if tls:
            where += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki}/server",
                      "--tls-creds", "tls0"]
        return ["qemu-nbd", "-f", fmt, "-x", "e", "--shared=8", "--persistent", *where, image]
    if name == "nbdkit":
        where = ["-U", sock] if transport in ("unix", "tls") else ["-i", "127.0.0.1", "-p", str(port)]
        if tls:
            where += ["--tls=require", f"--tls-certificates={pki}/server", "--tls-verify-peer"]
        return ["nbdkit", "-f", "--exportname=e", *where, "file", image]
    raise ValueError(name)


def uri_for(transport, sock, port, pki):
    if transport == "tls":
        return f"nbds+unix:///e?socket={sock}&tls-certificates={pki}/client"
    return f"nbd+unix:///e?socket={sock}" if transport == "unix" else f"nbd://127.0.0.1:{port}/e"


def make_pki(root):
    """A CA, a server and a client certificate, in the layout QEMU, nbdkit and libnbd read."""
    def certtool(*args, cwd):
        subprocess.run(["certtool", *args], cwd=cwd, check=True, capture_output=True)
    work = os.path.join(root, "work")
    os.makedirs(work)
    for name, tpl, signer in (("ca", "cn = bench CA\nca\ncert_signing_key\n", None),
                              ("server", "cn = localhost\ntls_www_server\nencryption_key\nsigning_key\n", "ca"),
                              ("client", "cn = client\ntls_www_client\nencryption_key\nsigning_key\n", "ca")):
        with open(os.path.join(work, f"{name}.info"), "w") as f:
            f.write(tpl)
        certtool("--generate-privkey", "--outfile", f"{name}-key.pem", cwd=work)
        if signer is None:
            certtool("--generate-self-signed", "--load-privkey", f"{name}-key.pem", "--template",
                     f"{name}.info", "--outfile", f"{name}-cert.pem", cwd=work)
        else:
            certtool("--generate-certificate", "--load-privkey", f"{name}-key.pem",
                     "--load-ca-certificate", "ca-cert.pem", "--load-ca-privkey", "ca-key.pem",
                     "--template", f"{name}.info", "--outfile", f"{name}-cert.pem", cwd=work)
    for side in ("server", "client", "home/.pki/libnbd"):
        d = os.path.join(root, side)
        os.makedirs(d)
        who = "server" if side == "server" else "client"
        for f in ("ca-cert.pem", f"{who}-cert.pem", f"{who}-key.pem"):
            shutil.copy(os.path.join(work, f), os.path.join(d, f.replace(who, "client") if side.endswith("libnbd") else f))
    # fio runs as nobody for the TLS rows: it must reach the socket and the client files.
    for dirpath, dirnames, filenames in os.walk(os.path.dirname(root)):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def cpu_seconds(pid):
    """User + system time of a process, threads that ended included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def stop_server(proc, timeout=20):
    """SIGTERM, then SIGKILL if the server has not exited within `timeout` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def nbdcopy(uri, connections):
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", f"--connections={connections}", "--requests=64", uri, "null:"],
                   check=True, capture_output=True)
    return GiB / (time.monotonic() - t0) / GiB  # GiB/s


def fio(uri, rw, seconds):
    # fio's nbd engine refuses tls-certificates in the URI (local file access), and libnbd's
    # default certificate directory for root is /etc/pki/libnbd: run it as nobody with a HOME
    # whose .pki/libnbd holds the client certificates instead.
    prefix = []
    if uri.startswith("nbds"):
        home = uri.split("tls-certificates=")[1].rsplit("/", 1)[0] + "/home"
        uri = uri.split("&tls-certificates=")[0]
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                  "env", f"HOME={home}"]
    r = subprocess.run([*prefix, "fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                        "--bs=4k", "--iodepth=32", "--size=1g", "--time_based",
                        f"--runtime={seconds}", "--norandommap", "--output-format=json"],
                       check=True, capture_output=True, text=True)
    # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = "read" if "read" in rw else "write"
    return job[side]["iops"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--binary", default="target/release/blockexportd")
    ap.add_argument("--servers", default="blockexportd,qemu-storage-daemon,qemu-nbd,nbdkit")
    ap.add_argument("--transports", default="unix,tcp,tls")
    ap.add_argument("--qcow2-transports", default="unix",
                    help="transports of the qcow2 rows (empty: none)")
    ap.add_argument("--dir", default=None,
                    help="where the images go (e.g. /dev/shm, so that the host's file system "
                         "does not bound the write rows); the system's temporary directory "
                         "by default")
    ap.add_argument("--only", default="", help="run only the tests whose name has this text")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                    help="another blockexportd binary, shown as 'blockexportd NAME'")
    args = ap.parse_args()
    binaries = {"blockexportd": os.path.abspath(args.binary)}
    extra = []
    for e in args.extra:
        label, path = e.split("=", 1)
        binaries[f"blockexportd {label}"] = os.path.abspath(path)
        extra.append(f"blockexportd {label}")
    for tool in ("nbdcopy", "nbdinfo", "fio", "qemu-storage-daemon", "qemu-nbd", "nbdkit", "certtool"):
        if not shutil.which(tool):
            sys.exit(f"missing tool: {tool}")
    servers = args.servers.split(",")
    servers[1:1] = extra
    work = tempfile.mkdtemp(prefix="bench-nbd-", dir=args.dir)
    pki = os.path.join(work, "pki")
    make_pki(pki)
    image = os.path.join(work, "disk.raw")
    with open(image, "wb") as f:  # real data everywhere: no holes for the clients to skip
        chunk = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(chunk)
    qcow2 = os.path.join(work, "disk.qcow2")
    qcow2_transports = [t for t in args.qcow2_transports.split(",") if t]
    if qcow2_transports:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2],
                       check=True)
    tests = [("seq read, nbdcopy 1 conn (GiB/s)", lambda u: nbdcopy(u, 1)),
             ("seq read, nbdcopy 4 conn (GiB/s)", lambda u: nbdcopy(u, 4)),
             ("4k randread QD32 (IOPS)", lambda u: fio(u, "randread", args.seconds)),
             ("4k randwrite QD32 (IOPS)", lambda u: fio(u, "randwrite", args.seconds))]
    tests = [t for t in tests if args.only in t[0]]
    results = {}  # (transport, test, server) -> [values]
    cpu = {}  # (transport, test, server) -> [server CPU seconds per GiB, or µs per request]
    rss = {s: 0 for s in servers}
    # (row transport label, transport, format)
    setups = [(t, t, "raw") for t in args.transports.split(",")]
    setups += [(f"{t} qcow2", t, "qcow2") for t in qcow2_transports]
    for rnd in range(args.rounds):
        for label, transport, fmt in setups:
            for server in servers:
                if fmt == "qcow2" and server == "nbdkit":
                    continue
                sock = os.path.join(work, "nbd.sock")
                port = free_port()
                if os.path.exists(sock):
                    os.unlink(sock)
                cmd = server_command(server, binaries, qcow2 if fmt == "qcow2" else image,
                                     transport, sock, port, pki, fmt)
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                try:
                    uri = uri_for(transport, sock, port, pki)
                    wait_ready(uri, proc)
                    if transport == "tls":
                        os.chmod(sock, 0o777)  # fio runs as nobody, see fio()
                    for name, fn in tests:
                        if transport == "tls" and "randwrite" in name:
                            continue
                        if fmt == "qcow2" and "nbdcopy" in name:
                            continue
                        c0 = cpu_seconds(proc.pid)
                        v = fn(uri)
                        c = cpu_seconds(proc.pid) - c0
                        results.setdefault((label, name, server), []).append(v)
                        # nbdcopy moves 1 GiB; fio runs `seconds` at v requests per second.
                        per = c if "GiB" in name else c * 1e6 / (v * args.seconds)
                        cpu.setdefault((label, name, server), []).append(per)
                        print(f"round {rnd + 1} {label:10} {server:20} {name:34} {v:12.2f}",
                              file=sys.stderr, flush=True)
                    rss[server] = max(rss[server], peak_rss_kib(proc.pid))
                finally:
                    stop_server(proc)
    ref = "qemu-storage-daemon"
    print(f"| transport | test | " + " | ".join(servers) + " |")
    print("|---|---|" + "---|" * len(servers))
    for transport, _, _ in setups:
        for name, _ in tests:
            cells = []
            base = statistics.median(results.get((transport, name, ref), [0])) or None
            if (transport, name, servers[0]) not in results:
                continue
            for s in servers:
                if (transport, name, s) not in results:
                    cells.append("n/a")
                    continue
                m = statistics.median(results[(transport, name, s)])
                fmt = f"{m:.2f}" if "GiB" in name else f"{m / 1000:.1f}k"
                if base and s != ref:
                    fmt += f" ({m / base:.2f}x)"
                cells.append(fmt)
            print(f"| {transport} | {name} | " + " | ".join(cells) + " |")
    print(f"| | peak RSS (MiB) | " + " | ".join(f"{rss[s] / 1024:.1f}" for s in servers) + " |")
    print()
    print("Server CPU time (lower is better): seconds per GiB for nbdcopy, µs per request for fio.")
    print()
    print(f"| transport | test | " + " | ".join(servers) + " |")
    print("|---|---|" + "---|" * len(servers))
    for transport, _, _ in setups:
        for name, _ in tests:
            if (transport, name, servers[0]) not in cpu:
                continue
            unit = "s/GiB" if "GiB" in name else "µs/req"
            row = name.split(" (")[0] + f" ({unit})"
            cells = [f"{statistics.median(cpu[(transport, name, s)]):.{3 if 'GiB' in name else 1}f}"
                     if (transport, name, s) in cpu else "n/a" for s in servers]
            print(f"| {transport} | {row} | " + " | ".join(cells) + " |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
