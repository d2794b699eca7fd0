//! The TDP fault path alone, for a profiler: 256 MiB of pre-faulted host
//! memory faulted in by direct `TdpMmu::page_fault` calls, one per 4K
//! page, `N` rounds (default 20), the tree zapped between rounds; prints
//! the best round in ns per fault.
//!
//! `cargo build --release --example fault_profile -p vmmu-bench`, then
//! `perf record -g target/release/examples/fault_profile 60`.

use vmmu::addr::{Gpa, Hva};
use vmmu::host::VmaFlags;
use vmmu::mmu::tdp::{FaultOutcome, TdpConfig, TdpFault};
use vmmu::vm::Vm;

fn main() {
    let bytes: u64 = 256 << 20;
    let vm = Vm::new(bytes, Hva::new(1 << 40), VmaFlags::WRITE, TdpConfig::default()).unwrap();
    let buf = [1u8; 8];
    for off in (0..bytes).step_by(4096) {
        vm.host.write(Hva::new((1 << 40) + off), &buf).unwrap();
    }
    let mut cache = vm.mmu.vcpu_caches();
    let rounds: u64 = std::env::args().nth(1).map_or(20, |s| s.parse().unwrap());
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let root = vm.mmu.get_root(0).unwrap();
        let outer = std::env::var_os("OUTER_PIN").map(|_| crossbeam_epoch::pin());
        let t = std::time::Instant::now();
        if std::env::var_os("PREFAULT").is_some() {
            let r = vm.mmu.pre_fault_memory(&root, Gpa::new(0), bytes, &mut cache).unwrap();
            assert_eq!((r.bytes, r.stopped), (bytes, None));
        }
        let faults = if std::env::var_os("PREFAULT").is_some() {
            0
        } else {
            bytes / 4096
        };
        for gfn in 0..faults {
            let fault = TdpFault {
                gpa: Gpa::new(gfn * 4096),
                write: true,
                exec: false,
                present: false,
            };
            loop {
                match vm.mmu.page_fault(&root, fault, &mut cache, None).unwrap() {
                    FaultOutcome::Fixed | FaultOutcome::Spurious => break,
                    FaultOutcome::Retry => continue,
                    o => panic!("{o:?}"),
                }
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (bytes / 4096) as f64;
        drop(outer);
        best = best.min(ns);
        drop(root);
        vm.mmu.zap_all_fast();
        vm.mmu.zap_invalidated_roots();
    }
    println!("best {best:.1} ns/fault");
}
