//! Bytes as a control-socket request line; the body is
//! `livecopy::fuzz::control_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livecopy::fuzz::control_request(data);
});
