//! The VDUSE benchmark: blockexportd and qemu-storage-daemon side by side, each exporting the
//! same image with the same command line as a vduse-blk export, in one guest whose kernel has
//! VDUSE (see `blockexportd_tests::kernel`), one after the other in every round. fio runs in
//! the guest on the `/dev/vdX` that `vdpa dev add` makes (with `--thread`: the guest kernel has
//! no System V shared memory).
//!
//! ```text
//! cargo build --release -p blockexportd
//! cargo build --release -p blockexportd-tests --bin vduse-bench
//! target/release/vduse-bench [--rounds 3] [--seconds 5] [--binary target/release/blockexportd]
//! ```
//!
//! The image (128 MiB of random data) is a file on the guest's tmpfs, so that the rows measure
//! the export, not a disk. The guest runs under QEMU's TCG (nested KVM hangs guests here), so
//! the absolute figures are the emulator's; the ratios between the two daemons, and the
//! server's CPU time per request (utime + stime from `/proc/PID/stat` over each fio run, all
//! threads), compare the exports. Printed: the medians over the rounds, ratios to QSD, mean
//! latency, CPU per request and peak RSS (VmHWM), as Markdown tables.

use blockexportd_tests::guest::{GuestKernel, Vm, VmConfig};
use blockexportd_tests::{kernel, require_tools};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

const SERVERS: [(&str, &str); 2] = [
    ("blockexportd", "/usr/bin/blockexportd"),
    ("qemu-storage-daemon", "/usr/bin/qemu-storage-daemon"),
];

/// (row name, fio `rw`, block size, iodepth, jobs)
const ROWS: [(&str, &str, &str, u32, u32); 4] = [
    ("4k randread QD32, 1 job", "randread", "4k", 32, 1),
    ("4k randread QD16, 2 jobs", "randread", "4k", 16, 2),
    ("4k randwrite QD32, 1 job", "randwrite", "4k", 32, 1),
    ("1M seqread QD8, 1 job", "read", "1m", 8, 1),
];

/// The unit of the times in `/proc/PID/stat` (fixed by the kernel's ABI on x86).
const USER_HZ: f64 = 100.0;

/// One fio run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    iops: f64,
    bytes_per_s: f64,
    lat_mean_us: f64,
    cpu_us_per_req: f64,
}

fn usage() -> ! {
    eprintln!("usage: vduse-bench [--rounds N] [--seconds S] [--binary PATH]");
    std::process::exit(2)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The guest's script: every round runs every server over every row.
fn script(rounds: u32, seconds: u32) -> String {
    let mut s = String::from(
        r#"
dd if=/dev/urandom of=/tmp/disk.img bs=1M count=128 2>/dev/null
ticks() { awk '{ print $14 + $15 }' /proc/$1/stat; }
serve() {
  $1 --blockdev driver=file,node-name=d0,filename=/tmp/disk.img \
    --export type=vduse-blk,id=e0,node-name=d0,name=vduse0,writable=on,num-queues=2 \
    2>/tmp/daemon.err &
  pid=$!
  i=0; while [ ! -e /dev/vduse/vduse0 ] && [ $i -lt 600 ]; do i=$((i+1)); usleep 50000; done
  [ -e /dev/vduse/vduse0 ] || echo "@@ERROR $1 made no /dev/vduse/vduse0: $(cat /tmp/daemon.err)"
  vdpa dev add name vduse0 mgmtdev vduse || echo "@@ERROR vdpa dev add for $1"
}
unserve() {
  vdpa dev del vduse0
  report rss_$1 $(awk '/VmHWM/ { print $2 }' /proc/$pid/status)
  kill $pid; wait $pid
  if [ -s /tmp/daemon.err ]; then echo "@@ERROR stderr: $(tr '\n' ' ' </tmp/daemon.err)"; fi
}
# KEY RW BS DEPTH JOBS
row() {
  t0=$(ticks $pid)
  fio --name=b --thread --filename=/dev/vda --direct=1 --ioengine=io_uring --rw=$2 --bs=$3 \
    --iodepth=$4 --numjobs=$5 --group_reporting --time_based --runtime=SECONDS \
    --output-format=json --output=/tmp/fio.json >/dev/null 2>/tmp/fio.err \
    || echo "@@ERROR fio: $(tr '\n' ' ' </tmp/fio.err)"
  t1=$(ticks $pid)
  report $1 $(jq -r '.jobs[0] | [.read.iops + .write.iops, .read.bw_bytes + .write.bw_bytes,
    (if .read.total_ios > 0 then .read.lat_ns.mean else .write.lat_ns.mean end),
    .read.total_ios + .write.total_ios] | map(tostring) | join(" ")' /tmp/fio.json) \
    $((t1 - t0))
}
"#,
    )
    .replace("SECONDS", &seconds.to_string());
    for round in 0..rounds {
        for (si, (_, program)) in SERVERS.iter().enumerate() {
            s.push_str(&format!("serve {program}\n"));
            for (ri, (_, rw, bs, depth, jobs)) in ROWS.iter().enumerate() {
                s.push_str(&format!(
                    "row r{round}_{si}_{ri} {rw} {bs} {depth} {jobs}\n"
                ));
            }
            s.push_str(&format!("unserve {round}_{si}\n"));
        }
    }
    s
}

fn parse(v: &str, key: &str) -> Sample {
    let f: Vec<f64> = v
        .split_whitespace()
        .map(|x| {
            x.parse()
                .unwrap_or_else(|_| panic!("{key}: bad value {v:?}"))
        })
        .collect();
    let [iops, bytes_per_s, lat_ns, ios, ticks] = f[..] else {
        panic!("{key}: expected 5 numbers, got {v:?}")
    };
    Sample {
        iops,
        bytes_per_s,
        lat_mean_us: lat_ns / 1000.0,
        cpu_us_per_req: ticks / USER_HZ * 1e6 / ios.max(1.0),
    }
}

fn main() {
    let mut rounds = 3u32;
    let mut seconds = 5u32;
    let mut binary = PathBuf::from("target/release/blockexportd");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--rounds" => rounds = value().parse().unwrap_or_else(|_| usage()),
            "--seconds" => seconds = value().parse().unwrap_or_else(|_| usage()),
            "--binary" => binary = PathBuf::from(value()),
            _ => usage(),
        }
    }
    if !binary.is_file() {
        eprintln!(
            "missing {}: cargo build --release -p blockexportd",
            binary.display()
        );
        std::process::exit(1);
    }
    let tools = [
        "qemu-system-x86_64",
        "vdpa",
        "fio",
        "jq",
        "qemu-storage-daemon",
    ];
    if !require_tools(&tools) || !kernel::require_vduse_kernel() {
        std::process::exit(1);
    }
    let image = kernel::vduse_kernel().unwrap_or_else(|e| panic!("the VDUSE guest kernel: {e}"));
    let mut cfg = VmConfig::bare(GuestKernel::Image(image), &script(rounds, seconds))
        .host_program("vdpa")
        .host_program("fio")
        .host_program("jq")
        .host_program("qemu-storage-daemon")
        .program(&binary, "/usr/bin/blockexportd");
    cfg.cpus = 2;
    cfg.memory_mib = 1024;

    let mut vm = Vm::boot(&cfg);
    let per_row = Duration::from_secs(u64::from(seconds) + 120);
    let mut samples: HashMap<(usize, usize), Vec<Sample>> = HashMap::new();
    let mut rss_kib = [0f64; SERVERS.len()];
    for round in 0..rounds {
        for (si, (server, _)) in SERVERS.iter().enumerate() {
            for (ri, (row, ..)) in ROWS.iter().enumerate() {
                let key = format!("r{round}_{si}_{ri}");
                let s = parse(&vm.result_within(&key, per_row), &key);
                eprintln!(
                    "round {} {server:20} {row:26} {:9.0} IOPS {:8.1} MiB/s {:7.1} µs CPU/req",
                    round + 1,
                    s.iops,
                    s.bytes_per_s / f64::from(1 << 20),
                    s.cpu_us_per_req
                );
                samples.entry((si, ri)).or_default().push(s);
            }
            let rss = vm.result_within(&format!("rss_{round}_{si}"), per_row);
            rss_kib[si] = rss_kib[si].max(rss.parse().unwrap_or(0.0));
        }
    }
    vm.finish();

    let med = |si: usize, ri: usize, f: fn(&Sample) -> f64| {
        median(samples[&(si, ri)].iter().map(f).collect())
    };
    let qsd = SERVERS.len() - 1;
    let header = format!(
        "| test | {} |\n|---|{}",
        SERVERS.map(|(s, _)| s).join(" | "),
        "---|".repeat(SERVERS.len())
    );
    println!("{header}");
    for (ri, (row, rw, ..)) in ROWS.iter().enumerate() {
        let seq = *rw == "read";
        let cells: Vec<String> = (0..SERVERS.len())
            .map(|si| {
                let (v, base) = if seq {
                    (
                        med(si, ri, |s| s.bytes_per_s),
                        med(qsd, ri, |s| s.bytes_per_s),
                    )
                } else {
                    (med(si, ri, |s| s.iops), med(qsd, ri, |s| s.iops))
                };
                let text = if seq {
                    format!("{:.2}", v / f64::from(1 << 30))
                } else {
                    format!("{:.1}k", v / 1000.0)
                };
                if si == qsd {
                    text
                } else {
                    format!("{text} ({:.2}x)", v / base)
                }
            })
            .collect();
        let unit = if seq { "GiB/s" } else { "IOPS" };
        println!("| {row} ({unit}) | {} |", cells.join(" | "));
    }
    let rss: Vec<String> = rss_kib
        .iter()
        .map(|k| format!("{:.1}", k / 1024.0))
        .collect();
    println!("| peak RSS (MiB) | {} |", rss.join(" | "));
    for (title, f) in [
        (
            "Mean latency (µs, medians over the rounds):",
            (|s: &Sample| s.lat_mean_us) as fn(&Sample) -> f64,
        ),
        (
            "Server CPU time per request (µs, lower is better):",
            |s: &Sample| s.cpu_us_per_req,
        ),
    ] {
        println!("\n{title}\n\n{header}");
        for (ri, (row, ..)) in ROWS.iter().enumerate() {
            let cells: Vec<String> = (0..SERVERS.len())
                .map(|si| format!("{:.1}", med(si, ri, f)))
                .collect();
            println!("| {row} | {} |", cells.join(" | "));
        }
    }
}
