//! The workload file parser (`vmmu::fuzz::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmmu::fuzz::parse::workload(data);
});
