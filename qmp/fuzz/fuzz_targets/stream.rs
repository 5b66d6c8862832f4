//! Fuzzes the QMP JSON stream reader: any bytes, cut at a point chosen by
//! the input, must give the same messages as in one piece, never buffer more
//! than the limit, and every message read must survive write/read round
//! trips: after one normalisation (`-0.0` prints as `-0`, which reads back as
//! the integer 0, exactly as in QEMU) the output is a fixpoint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmp_server::writer::to_qemu_json;
use qmp_server::{JsonStream, StreamLimits};

const LIMITS: StreamLimits = StreamLimits {
    max_message_bytes: 4096,
    max_tokens: 512,
    max_nesting: 64,
};

fn read(chunks: &[&[u8]]) -> Vec<Result<serde_json::Value, String>> {
    let mut s = JsonStream::new(LIMITS);
    let mut out = Vec::new();
    for c in chunks {
        s.feed(c, |m| out.push(m.map_err(|e| e.to_string())));
        assert!(s.buffered() <= LIMITS.max_message_bytes);
    }
    out
}

fn reread(text: &str) -> serde_json::Value {
    let mut again = read(&[text.as_bytes(), b"\n"]);
    assert_eq!(again.len(), 1, "{text}");
    again.remove(0).expect("our own output parses")
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let at = usize::from(cut).min(data.len());
    let whole = read(&[data]);
    assert_eq!(whole, read(&[&data[..at], &data[at..]]));
    for v in whole.into_iter().flatten() {
        for pretty in [false, true] {
            let once = reread(&to_qemu_json(&v, pretty));
            let text = to_qemu_json(&once, pretty);
            assert_eq!(to_qemu_json(&reread(&text), pretty), text);
        }
    }
});
