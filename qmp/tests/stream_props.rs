//! Property tests of the JSON stream reader and writer.

use proptest::prelude::*;
use qmp_server::writer::to_qemu_json;
use qmp_server::{JsonStream, StreamLimits};
use serde_json::{Map, Value};

fn collect(limits: StreamLimits, chunks: &[&[u8]]) -> (Vec<Result<Value, String>>, usize) {
    let mut s = JsonStream::new(limits);
    let mut out = Vec::new();
    let mut max_buffered = 0;
    for c in chunks {
        s.feed(c, |m| out.push(m.map_err(|e| e.to_string())));
        max_buffered = max_buffered.max(s.buffered());
    }
    (out, max_buffered)
}

fn small_limits() -> StreamLimits {
    StreamLimits {
        max_message_bytes: 256,
        max_tokens: 64,
        max_nesting: 8,
    }
}

/// JSON values without floats (an integral float prints as an integer, as in
/// QEMU, so it would not come back as the same `Value`).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<String>()
            .prop_filter("QEMU refuses noncharacters", |s| s.chars().all(|c| {
                let cp = c as u32;
                !(0xFDD0..=0xFDEF).contains(&cp) && (cp & 0xFFFE) != 0xFFFE
            }))
            .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z-]{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    /// Any bytes, cut anywhere: no panic, the same messages as in one piece,
    /// and never more buffered than the limit.
    #[test]
    fn any_bytes_any_cut(data in prop::collection::vec(any::<u8>(), 0..2048), cut in any::<prop::sample::Index>()) {
        let limits = small_limits();
        let (whole, max1) = collect(limits, &[&data]);
        let at = if data.is_empty() { 0 } else { cut.index(data.len()) };
        let (split, max2) = collect(limits, &[&data[..at], &data[at..]]);
        prop_assert_eq!(&whole, &split);
        prop_assert!(max1 <= limits.max_message_bytes);
        prop_assert!(max2 <= limits.max_message_bytes);
    }

    /// JSON-ish bytes (mostly structural characters) exercise the parser
    /// rather than the lexer's error path.
    #[test]
    fn jsonish_bytes(data in prop::collection::vec(prop::sample::select(b"{}[]:,\"'\\ 0123456789-.eEtruefalsnl\n\t\xff".to_vec()), 0..1024)) {
        let limits = small_limits();
        let (whole, max) = collect(limits, &[&data]);
        let (one_by_one, _) = collect(limits, &data.iter().map(std::slice::from_ref).collect::<Vec<_>>());
        prop_assert_eq!(whole, one_by_one);
        prop_assert!(max <= limits.max_message_bytes);
    }

    /// What we write (compact or pretty) reads back as the same value, and
    /// several values in a row come back as several messages.
    #[test]
    fn write_then_read(values in prop::collection::vec(json_value(), 1..4), pretty in any::<bool>()) {
        let mut bytes = Vec::new();
        for v in &values {
            // Top-level scalars need a separator to end; objects do not.
            bytes.extend(to_qemu_json(v, pretty).into_bytes());
            bytes.push(b'\n');
        }
        let (got, _) = collect(StreamLimits::default(), &[&bytes]);
        let want: Vec<Result<Value, String>> = values.into_iter().map(Ok).collect();
        prop_assert_eq!(got, want);
    }
}
