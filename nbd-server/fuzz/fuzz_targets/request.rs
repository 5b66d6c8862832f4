//! Request header decoding: never panics; what decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::proto::{BlockStatusPayload, RequestHeader};

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        if let Ok(header) = RequestHeader::decode(data, extended) {
            let mut out = Vec::new();
            header.encode(extended, &mut out);
            assert_eq!(out, data);
        }
    }
    if let Ok(p) = BlockStatusPayload::decode(data) {
        assert_eq!(8 + 4 * p.ids.len(), data.len());
    }
});
