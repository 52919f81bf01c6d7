//! Bytes as what an NBD server sends the client; the body is
//! `livecopy::fuzz::nbd_replies`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livecopy::fuzz::nbd_replies(data);
});
