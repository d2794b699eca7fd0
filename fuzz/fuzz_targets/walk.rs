//! The guest walker against the SDM reference walker (`vmmu::fuzz::walk`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu::fuzz::walk::{WalkInput, walk_one};

fuzz_target!(|input: WalkInput| {
    walk_one(&input);
});
