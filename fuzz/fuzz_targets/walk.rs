//! The guest walker against the SDM reference walker (`vmmu_fuzz::walk`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_fuzz::walk::{WalkInput, walk_one};

fuzz_target!(|input: WalkInput| {
    walk_one(&input);
});
