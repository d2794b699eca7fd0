//! The TDP fault path alone, for a profiler: 256 MiB of pre-faulted host
//! memory faulted in, one 4K page at a time, `N` rounds (default 20), the
//! tree zapped between rounds; prints the best round in ns per page.
//!
//! How the pages are faulted in: by direct `TdpMmu::page_fault` calls (the
//! default), by one `TdpMmu::pre_fault_memory` call (`PREFAULT=1`), or by a
//! vCPU's writes (`VCPU=1`: TLB miss, EPT violation, fault, retry).
//!
//! `cargo build --release --example fault_profile -p vmmu-bench`, then
//! `perf record -g target/release/examples/fault_profile 60`.

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::host::VmaFlags;
use vmmu::mmu::tdp::{FaultOutcome, TdpConfig, TdpFault};
use vmmu::vm::Vm;
use vmmu::walker::ControlRegs;

fn main() {
    let bytes: u64 = 256 << 20;
    let pages = bytes / 4096;
    let vm = Vm::new(bytes, Hva::new(1 << 40), VmaFlags::WRITE, TdpConfig::default()).expect("a VM");
    for off in (0..bytes).step_by(4096) {
        vm.host
            .write(Hva::new((1 << 40) + off), &[0])
            .expect("pre-faulting the host");
    }
    let mut cache = vm.mmu.vcpu_caches();
    let rounds: u64 = std::env::args()
        .nth(1)
        .map_or(20, |s| s.parse().expect("a number of rounds"));
    let (prefault, vcpu) = (
        std::env::var_os("PREFAULT").is_some(),
        std::env::var_os("VCPU").is_some(),
    );
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let root = vm.mmu.get_root(0).expect("a root");
        let mut v = vcpu.then(|| {
            vm.vcpu(CpuFeatures::default(), 1, ControlRegs::default(), 0)
                .expect("a vCPU")
        });
        let t = std::time::Instant::now();
        if let Some(v) = v.as_mut() {
            for gfn in 0..pages {
                v.access(Gva::new(gfn * 4096), Access::new(AccessKind::Write, 0, false), 8, gfn)
                    .expect("a write");
            }
        } else if prefault {
            let r = vm
                .mmu
                .pre_fault_memory(&root, Gpa::new(0), bytes, &mut cache)
                .expect("a pre-fault");
            assert_eq!((r.bytes, r.stopped), (bytes, None));
        } else {
            for gfn in 0..pages {
                let fault = TdpFault {
                    gpa: Gpa::new(gfn * 4096),
                    write: true,
                    exec: false,
                    present: false,
                };
                while let FaultOutcome::Retry = vm.mmu.page_fault(&root, fault, &mut cache, None).expect("a fault") {}
            }
        }
        best = best.min(t.elapsed().as_nanos() as f64 / pages as f64);
        drop((v, root));
        vm.mmu.zap_all_fast();
        vm.mmu.zap_invalidated_roots();
    }
    println!("best {best:.1} ns per page");
}
