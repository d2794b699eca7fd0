//! The whole VM: guest and host/VMM operations on the shadow or the TDP
//! MMU with the checker on (`vmmu_fuzz::vm`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_fuzz::vm::{VmProgram, run};

fuzz_target!(|program: VmProgram| {
    run(&program);
});
