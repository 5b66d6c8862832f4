//! Option header and option data decoding: never panics; what decodes re-encodes exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::proto::{InfoRequest, MetaContextRequest, OptionHeader};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = OptionHeader::decode(data) {
        let mut out = Vec::new();
        h.encode(&mut out);
        assert_eq!(out, data);
    }
    if let Ok(r) = InfoRequest::decode(data) {
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out, data);
    }
    if let Ok(r) = MetaContextRequest::decode(data) {
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out, data);
    }
});
