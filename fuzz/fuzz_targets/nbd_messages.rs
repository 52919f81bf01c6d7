//! Bytes as NBD requests and options; the body is `livecopy::fuzz::nbd_messages`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livecopy::fuzz::nbd_messages(data);
});
