//! The conformance-case parser, one case per line (`vmmu_fuzz::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmmu_fuzz::parse::conform_case(data);
});
