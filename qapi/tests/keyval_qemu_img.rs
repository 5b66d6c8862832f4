//! `keyval::parse_size` against the real `qemu_strtosz()`, as `qemu-img create` uses it
//! for the image size: hand-picked and generated size strings must be accepted or
//! rejected alike, with the same value.
//!
//! `qemu-img` prints `Formatting '...', fmt=raw size=N` when it accepts a size; it
//! rejects values above `i64::MAX` together with out-of-range ones ("Must be between
//! 0 and 9223372036854775807"), and anything else as invalid.
//!
//! Requires `qemu-img`: fails when it is missing and `CI=true`, skips with a message
//! otherwise.

use std::path::PathBuf;
use std::process::Command;

use qsd_qapi::keyval;

const QEMU_IMG: &str = "qemu-img";

fn have_qemu_img() -> bool {
    test_support::require_runs(QEMU_IMG)
}

/// What qemu-img makes of `size`.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Accepted, with this value.
    Size(u64),
    /// Out of range: negative, beyond `u64`, or beyond `i64::MAX`.
    OutOfRange,
    /// Not a size.
    Invalid,
}

fn qemu_img_size(image: &PathBuf, size: &str) -> Verdict {
    let out = Command::new(QEMU_IMG)
        .args(["create", "-f", "raw", "--"])
        .arg(image)
        .arg(size)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {QEMU_IMG}: {e}"));
    let _ = std::fs::remove_file(image);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(rest) = text.split(" size=").nth(1) {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        match digits.parse() {
            Ok(n) => Verdict::Size(n),
            Err(e) => panic!("cannot read qemu-img's size in {text:?}: {e}"),
        }
    } else if text.contains("Must be between 0 and 9223372036854775807") {
        Verdict::OutOfRange
    } else {
        assert!(
            text.contains("Invalid image size specified"),
            "unexpected qemu-img output for {size:?}: {text:?}"
        );
        Verdict::Invalid
    }
}

fn check(image: &PathBuf, size: &str) {
    let ours = keyval::parse_size(size);
    let theirs = qemu_img_size(image, size);
    let agrees = match (&theirs, ours) {
        (Verdict::Size(n), Some(v)) => *n == v,
        (Verdict::OutOfRange, None) => true,
        (Verdict::OutOfRange, Some(v)) => v > i64::MAX as u64,
        (Verdict::Invalid, None) => true,
        _ => false,
    };
    assert!(
        agrees,
        "{size:?}: we say {ours:?}, qemu-img says {theirs:?}"
    );
}

fn image_path() -> PathBuf {
    std::env::temp_dir().join(format!("keyval-size-test-{}.img", std::process::id()))
}

#[test]
fn hand_picked_sizes_match_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let image = image_path();
    for size in [
        "0",
        "512",
        "1k",
        "1K",
        "64k",
        "1M",
        "1.5G",
        "2T",
        "1P",
        "7.9999E",
        "8E",
        "1.0005k",
        "1.0015k",
        "0.5k",
        ".5k",
        "+.5k",
        " 1k",
        "1.k",
        "1.",
        "1.5",
        "1.5b",
        "0x10",
        "0x1b",
        "0X1F",
        "0x20M",
        "0x1p3",
        "0x1.8",
        "0x",
        "1e3",
        "1.5e1k",
        "08",
        "1k ",
        "1b",
        "-0",
        "-1",
        "-.5k",
        "",
        ".",
        ".k",
        "k",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551616",
        "0.0000000000000000000001k",
        "0.99999999999999999999k",
        "12345678.87654321k",
    ] {
        check(&image, size);
    }
}

use test_support::Rng;

#[test]
fn generated_sizes_match_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let image = image_path().with_extension("gen.img");
    let pieces = [
        "0", "1", "5", "9", "00", "123", "4096", ".", ".", "5", "k", "M", "G", "T", "E", "b", "x",
        "0x", "f", "e", "+", "-", " ",
    ];
    let mut rng = Rng::new(0x7369_7a65);
    for _ in 0..300 {
        let len = 1 + rng.index(5);
        let size: String = (0..len).map(|_| pieces[rng.index(pieces.len())]).collect();
        check(&image, &size);
    }
}
