//! A valid journal, damaged as the input describes, through recovery and
//! repair; the body is `livecopy::fuzz::recover_image`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    livecopy::fuzz::recover_image(data);
});
