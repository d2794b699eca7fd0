//! The TDP MMU's `tracing` events carry KVM's tracepoint names. In a test
//! binary of its own: `tracing` caches each callsite's interest globally,
//! so other tests hitting the same callsites concurrently without a
//! subscriber would make this one flaky.

use std::sync::Arc;

use vmmu::addr::{Gva, Hva};
use vmmu::arch::control::CpuFeatures;
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mem::MemslotFlags;
use vmmu::mmu::tdp::TdpConfig;
use vmmu::vm::Vm;
use vmmu::walker::ControlRegs;

const MB: u64 = 1 << 20;

/// A VM with one memslot of `size` at gpa 0, backed at `hva`.
fn vm(size: u64, hva: u64, flags: VmaFlags) -> Vm {
    Vm::new(size, Hva::new(hva), flags, TdpConfig::default()).unwrap()
}

fn vcpu(vm: &Vm, vpid: u16) -> Vcpu {
    let mut v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), CpuFeatures::default(), vpid).unwrap();
    v.set_state(ControlRegs::default(), 0, 0).unwrap();
    v
}

fn read(v: &mut Vcpu, gpa: u64) {
    assert!(matches!(
        v.access(Gva::new(gpa), Access::new(AccessKind::Read, 0, false), 8, 0)
            .unwrap(),
        AccessResult::Done { .. }
    ));
}

fn write(v: &mut Vcpu, gpa: u64, value: u64) {
    assert!(matches!(
        v.access(Gva::new(gpa), Access::new(AccessKind::Write, 0, false), 8, value)
            .unwrap(),
        AccessResult::Done { .. }
    ));
}

fn set_logging(vm: &Vm, on: bool) {
    let flags = if on {
        MemslotFlags::LOG_DIRTY_PAGES
    } else {
        MemslotFlags::empty()
    };
    vm.slots.update_flags(0, 0, flags).unwrap();
}

#[test]
fn tracepoints_are_named_as_kvms() {
    use std::sync::Mutex;
    use tracing_subscriber::layer::{Context, SubscriberExt};
    /// Records the target of every event.
    struct Targets(Arc<Mutex<Vec<String>>>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Targets {
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
            self.0.lock().unwrap().push(event.metadata().target().to_string());
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Targets(seen.clone()));
    tracing::subscriber::with_default(subscriber, || {
        let vm = vm(4 * MB, 0x4000_0000, VmaFlags::WRITE | VmaFlags::THP);
        let mut v = vcpu(&vm, 1);
        write(&mut v, 0x1000, 1); // kvm_page_fault, kvm_mmu_set_spte (2M)
        read(&mut v, 0x1000_0000); // mark_mmio_spte
        set_logging(&vm, true); // kvm_mmu_split_huge_page
        write(&mut v, 0x2000, 2); // fast_page_fault
        vm.host.migrate(Hva::new(0x4000_2000)).unwrap(); // kvm_tdp_mmu_spte_changed
    });
    let seen = seen.lock().unwrap();
    for name in [
        "kvm_page_fault",
        "kvm_mmu_set_spte",
        "mark_mmio_spte",
        "kvm_mmu_split_huge_page",
        "fast_page_fault",
        "kvm_tdp_mmu_spte_changed",
    ] {
        assert!(seen.iter().any(|t| t == name), "no {name} event in {seen:?}");
    }
}
