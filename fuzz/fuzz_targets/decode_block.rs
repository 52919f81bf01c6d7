//! One 4096-byte journal block through `format::decode` and the payload
//! decoders; the body is `livecopy::fuzz::decode_block`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livecopy::fuzz::decode_block(data);
});
