//! vhost-load: drives a vhost-user-blk device through libblkio (no VM) and prints one JSON
//! object with the throughput and the latency.
//!
//! ```text
//! vhost-load --socket PATH [--queues N] [--pattern randread|randwrite|seqread]
//!            [--bs 4k] [--depth 32] [--seconds 5]
//! ```
//!
//! One thread per virtqueue keeps `depth` requests in flight on its queue: each completion is
//! replaced at once by a new request, until `seconds` have passed; then the requests in
//! flight are reaped. Random offsets are aligned to the block size; a sequential reader per
//! queue starts at its share of the device and wraps at its end. Completions are waited for
//! on the queue's eventfd (libblkio's interrupt mode, as a guest with interrupts).
//!
//! Printed: `{"pattern", "queues", "bs", "depth", "seconds", "ops", "iops", "mib_s",
//! "lat_mean_us", "lat_p99_us"}`; `seconds` runs from the first submission to the last
//! completion and latency from a request's submission to the `do_io` call that reaped it.

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::process::exit;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
}

struct Args {
    socket: String,
    queues: usize,
    pattern: Pattern,
    bs: usize,
    depth: usize,
    seconds: f64,
}

fn usage(msg: &str) -> ! {
    eprintln!("vhost-load: {msg}");
    eprintln!(
        "usage: vhost-load --socket PATH [--queues N] [--pattern randread|randwrite|seqread] \
         [--bs SIZE] [--depth N] [--seconds S]"
    );
    exit(2);
}

/// A size with an optional k/m suffix (powers of 1024).
fn parse_size(s: &str) -> usize {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.strip_suffix('k') {
        Some(n) => (n, 1 << 10),
        None => match lower.strip_suffix('m') {
            Some(n) => (n, 1 << 20),
            None => (lower.as_str(), 1),
        },
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .unwrap_or_else(|_| usage(&format!("bad size {s:?}")))
}

fn parse_args() -> Args {
    let mut args = Args {
        socket: String::new(),
        queues: 1,
        pattern: Pattern::RandRead,
        bs: 4096,
        depth: 32,
        seconds: 5.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--socket" => args.socket = value(),
            "--queues" => args.queues = value().parse().unwrap_or_else(|_| usage("bad --queues")),
            "--pattern" => {
                args.pattern = match value().as_str() {
                    "randread" => Pattern::RandRead,
                    "randwrite" => Pattern::RandWrite,
                    "seqread" => Pattern::SeqRead,
                    p => usage(&format!("unknown pattern {p:?}")),
                }
            }
            "--bs" => args.bs = parse_size(&value()),
            "--depth" => args.depth = value().parse().unwrap_or_else(|_| usage("bad --depth")),
            "--seconds" => {
                args.seconds = value().parse().unwrap_or_else(|_| usage("bad --seconds"))
            }
            "-h" | "--help" => usage("help"),
            f => usage(&format!("unknown argument {f:?}")),
        }
    }
    if args.socket.is_empty() {
        usage("--socket is required");
    }
    if args.queues == 0 || args.depth == 0 || args.bs == 0 || !args.bs.is_multiple_of(512) {
        usage("--queues and --depth must be > 0, --bs a multiple of 512");
    }
    args
}

fn fail(what: &str, e: blkio::Error) -> ! {
    eprintln!(
        "vhost-load: {what}: {} (errno {})",
        e.message(),
        e.errno().raw_os_error()
    );
    exit(1);
}

/// What one queue's thread measured.
struct QueueResult {
    ops: u64,
    first_submit: Instant,
    last_completion: Instant,
    latencies_ns: Vec<u64>,
}

/// Keeps `depth` requests in flight on `q` until `end`, each with its own `bs` buffer at
/// `bufs + slot * bs` (inside the mapped region).
fn run_queue(
    mut q: Blkioq,
    index: usize,
    args: &Args,
    capacity: u64,
    bufs: usize,
    end: Instant,
) -> QueueResult {
    let bs = args.bs as u64;
    let blocks = capacity / bs;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ ((index as u64 + 1) << 32);
    let mut random_block = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % blocks
    };
    // Each queue reads its own share of the device sequentially.
    let share = blocks / args.queues as u64;
    let mut seq = share * index as u64;
    let mut next_offset = move || match args.pattern {
        Pattern::SeqRead => {
            let off = seq * bs;
            seq = (seq + 1) % blocks;
            off
        }
        _ => random_block() * bs,
    };
    let mut submitted = vec![Instant::now(); args.depth];
    let submit = |q: &mut Blkioq, slot: usize, offset: u64, submitted: &mut [Instant]| {
        let buf = (bufs + slot * args.bs) as *mut u8;
        submitted[slot] = Instant::now();
        match args.pattern {
            Pattern::RandWrite => q.write(offset, buf, args.bs, slot, ReqFlags::empty()),
            _ => q.read(offset, buf, args.bs, slot, ReqFlags::empty()),
        }
    };
    let first_submit = Instant::now();
    for slot in 0..args.depth {
        submit(&mut q, slot, next_offset(), &mut submitted);
    }
    let mut in_flight = args.depth;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..args.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut latencies_ns = Vec::with_capacity(1 << 20);
    let mut ops = 0u64;
    let mut last_completion = first_submit;
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(30);
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .unwrap_or_else(|e| fail(&format!("queue {index}: do_io"), e));
        let now = Instant::now();
        last_completion = now;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                eprintln!("vhost-load: queue {index}: request failed: {}", c.ret);
                exit(1);
            }
            let slot = c.user_data;
            latencies_ns.push(now.duration_since(submitted[slot]).as_nanos() as u64);
            ops += 1;
            if now < end {
                submit(&mut q, slot, next_offset(), &mut submitted);
            } else {
                in_flight -= 1;
            }
        }
    }
    QueueResult {
        ops,
        first_submit,
        last_completion,
        latencies_ns,
    }
}

fn main() {
    let args = parse_args();
    let mut blkio =
        Blkio::new("virtio-blk-vhost-user").unwrap_or_else(|e| fail("virtio-blk-vhost-user", e));
    blkio
        .set_str("path", &args.socket)
        .unwrap_or_else(|e| fail("path", e));
    blkio.connect().unwrap_or_else(|e| fail("connect", e));
    blkio
        .set_i32("num-queues", args.queues as i32)
        .unwrap_or_else(|e| fail("num-queues", e));
    // Room for `depth` requests of up to 3 descriptors (header, data, status) on each queue.
    let queue_size = (3 * args.depth).next_power_of_two().max(64) as i32;
    blkio
        .set_i32("queue-size", queue_size)
        .unwrap_or_else(|e| fail("queue-size", e));
    let capacity = blkio
        .get_u64("capacity")
        .unwrap_or_else(|e| fail("capacity", e));
    if capacity < args.bs as u64 {
        eprintln!("vhost-load: the device ({capacity} bytes) is smaller than one block");
        exit(1);
    }
    let started = blkio.start().unwrap_or_else(|e| fail("start", e));
    let align = blkio
        .get_u64("mem-region-alignment")
        .unwrap_or_else(|e| fail("mem-region-alignment", e)) as usize;
    let per_queue = (args.bs * args.depth).next_multiple_of(align.max(4096));
    let region = blkio
        .alloc_mem_region(per_queue * args.queues)
        .unwrap_or_else(|e| fail("alloc_mem_region", e));
    blkio
        .map_mem_region(&region)
        .unwrap_or_else(|e| fail("map_mem_region", e));
    if args.pattern == Pattern::RandWrite {
        // SAFETY: the region is `per_queue * queues` bytes, mapped read-write by this
        // process, and no request is in flight yet.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region.len) };
    }

    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let args_ref = &args;
    let results: Vec<QueueResult> = std::thread::scope(|s| {
        let handles: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let bufs = region.addr + i * per_queue;
                s.spawn(move || run_queue(q, i, args_ref, capacity, bufs, end))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread"))
            .collect()
    });

    let first = results
        .iter()
        .map(|r| r.first_submit)
        .min()
        .expect("a queue");
    let last = results
        .iter()
        .map(|r| r.last_completion)
        .max()
        .expect("a queue");
    let seconds = last.duration_since(first).as_secs_f64();
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let mut lat: Vec<u64> = results.into_iter().flat_map(|r| r.latencies_ns).collect();
    lat.sort_unstable();
    let mean = lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64;
    let p99 = lat
        .get(((lat.len() as f64 * 0.99) as usize).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0);
    let iops = ops as f64 / seconds;
    let out = serde_json::json!({
        "pattern": format!("{:?}", args.pattern).to_lowercase(),
        "queues": args.queues,
        "bs": args.bs,
        "depth": args.depth,
        "seconds": seconds,
        "ops": ops,
        "iops": iops,
        "mib_s": iops * args.bs as f64 / (1 << 20) as f64,
        "lat_mean_us": mean / 1000.0,
        "lat_p99_us": p99 as f64 / 1000.0,
    });
    println!("{out}");
}
