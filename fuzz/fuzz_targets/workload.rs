//! The workload file parser (`vmmu_fuzz::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmmu_fuzz::parse::workload(data);
});
