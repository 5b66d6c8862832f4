//! Fuzzes the QEMU keyval/JSON/QemuOpts option parsers: it never panics, and whatever it accepts
//! renders back to keyval text that parses to the same object.
#![no_main]

use qsd_qapi::keyval;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Command-line arguments reach the parser as &str.
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    // Let the input choose the implied key too (plain, dotted, none).
    let implied = match data.len() % 3 {
        0 => Some("driver"),
        1 => Some("addr.type"),
        _ => None,
    };

    if let Ok(map) = keyval::parse(input, implied) {
        let text = match keyval::render(&map) {
            Ok(text) => text,
            Err(e) => panic!("parse result {map:?} does not render: {e}"),
        };
        assert_eq!(keyval::parse(&text, None), Ok(map), "re-parse of {text:?}");
    }
    let _ = keyval::parse_with_help(input, implied);

    if let Ok(map) = keyval::parse_json_or_keyval(input, implied) {
        if input.starts_with('{') {
            // JSON in, JSON out, JSON in again: the same object.
            let text = serde_json::to_string(&map).unwrap_or_default();
            assert_eq!(
                keyval::parse_json_or_keyval(&text, None),
                Ok(map),
                "{text:?}"
            );
        }
    }

    if let Ok(opts) = keyval::parse_opts(input, implied) {
        // QemuOpts is flat: every value is a string.
        assert!(opts.values.values().all(|v| v.is_string()), "{opts:?}");
    }

    let _ = keyval::parse_size(input);
    let _ = keyval::parse_int64(input);
    let _ = keyval::parse_uint64(input);
    let _ = keyval::parse_number(input);
});
