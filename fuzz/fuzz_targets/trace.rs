//! The trace file parser and writer (`vmmu_fuzz::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmmu_fuzz::parse::trace(data);
});
