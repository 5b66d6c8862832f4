//! Decodes an NBD request header given in hex (compact, 28 bytes, or extended, 32 bytes).
//!
//! `cargo run -p nbd-proto --example decode_request -- 25609513000100010000000000000007000000000000100000000200`

use nbd_proto::{RequestHeader, COMPACT_REQUEST_SIZE, EXTENDED_REQUEST_SIZE};

fn main() {
    let hex = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: decode_request HEX");
        std::process::exit(2)
    });
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect();
    let Some(bytes) = bytes else {
        eprintln!("not hex: {hex}");
        std::process::exit(2)
    };
    let extended = bytes.len() == EXTENDED_REQUEST_SIZE;
    if !extended && bytes.len() != COMPACT_REQUEST_SIZE {
        eprintln!(
            "{} bytes: a request header has {COMPACT_REQUEST_SIZE} or {EXTENDED_REQUEST_SIZE}",
            bytes.len()
        );
        std::process::exit(2)
    }
    match RequestHeader::decode(&bytes, extended) {
        Ok(h) => println!(
            "{} flags={:#x} cookie={} offset={} length={}",
            h.command, h.flags, h.cookie, h.offset, h.length
        ),
        Err(e) => {
            eprintln!("invalid request: {e}");
            std::process::exit(1)
        }
    }
}
