//! A proptest state machine over guest operations, on both MMUs, judged
//! from the x86 side: a 4-level guest edits its own page tables through its
//! address space (CPL 0 stores to a linear mapping of its tables), flushes
//! with INVLPG or CR3 loads, switches between two address spaces, toggles
//! CR0.WP, and reads, writes and fetches at CPL 0 and 3. Every access is
//! compared with the foundation walker run on guest memory:
//!
//! - with no unflushed change since the translation was last flushed, the
//!   result (the #PF error code, or the guest-physical address) is exactly
//!   the walker's on the current memory;
//! - otherwise it may also be what the walker gives on any page-table state
//!   that held since the page's last flush, and only those: the processor
//!   may cache a translation at any time, speculatively too (SDM 4.10.2.3),
//!   so an edit without a flush may leave any translation valid since the
//!   flush in the TLB. A #PF on the page flushes it (SDM 4.10.4.1).
//!
//! This is the architecture's TLB without paging-structure caches; the
//! shadow MMU must never show anything else, whatever it write-protects,
//! zaps, emulates or leaves unsync underneath.

use proptest::prelude::*;
use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Cr0, Cr4, Efer};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::{AccessResult, GuestFault, Vcpu};
use vmmu::host::VmaFlags;
use vmmu::mem::GuestMemory;
use vmmu::mmu::tdp::TdpConfig;
use vmmu::vm::{ShadowVm, Vm};
use vmmu::walker::{ControlRegs, EntrySize, GuestPaging, PtMemory, Root, WalkError};

const PML4_A: u64 = 0x1000;
const PML4_B: u64 = 0x6000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
/// The page table the guest edits: it maps va 0..2 MiB.
const PT: u64 = 0x4000;
/// The page table mapping the guest's own tables at va 2 MiB..4 MiB.
const PT_SELF: u64 = 0x5000;
/// Where the guest sees `PT` (va of its entry 0).
const PT_VA: u64 = 0x20_0000 + PT;
/// Data frames the guest maps.
const DATA: u64 = 0x10000;
const DATA_PAGES: u64 = 8;
/// Guest memory the model snapshots (tables and data).
const SNAP: u64 = DATA + DATA_PAGES * 0x1000;
/// The vas the test touches: pages 0..8 of the edited table.
const VAS: u64 = 8;

#[derive(Clone, Debug)]
enum Op {
    /// The guest stores `value` to entry `index` of `PT`.
    WritePte {
        index: u64,
        value: u64,
    },
    /// The guest stores to the PD entry for va 0..2 MiB (pointing at `PT`
    /// with these flags, or at a data page).
    WritePde {
        flags: u64,
        to_data: bool,
    },
    Invlpg {
        page: u64,
    },
    /// MOV to CR3 (A or B): flushes everything (no PCID, no PGE).
    MovCr3 {
        b: bool,
    },
    SetWp {
        wp: bool,
    },
    Access {
        page: u64,
        offset: u64,
        kind: u8,
        user: bool,
    },
}

fn pte_value() -> impl Strategy<Value = u64> {
    (0..DATA_PAGES + 2, any::<u8>()).prop_map(|(frame, bits)| {
        let addr = if frame < DATA_PAGES {
            DATA + frame * 0x1000
        } else {
            // A page table used as data.
            PT - (frame - DATA_PAGES) * 0x1000
        };
        let mut v = addr;
        v |= u64::from(bits & 1); // P
        v |= u64::from(bits & 2); // R/W
        v |= u64::from(bits & 4); // U/S
        if bits & 8 != 0 {
            v |= 1 << 63; // XD
        }
        if bits & 0x10 != 0 {
            v |= 1 << 5; // A
        }
        if bits & 0x20 != 0 {
            v |= 1 << 6; // D
        }
        if bits & 0xc0 == 0xc0 {
            v |= 1 << 51; // reserved (MAXPHYADDR 46)
        }
        v
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..VAS, pte_value()).prop_map(|(index, value)| Op::WritePte { index, value }),
        1 => (0u64..8, any::<bool>()).prop_map(|(f, to_data)| Op::WritePde { flags: 1 | ((f & 1) << 1) | ((f & 2) << 1) | ((f & 4) << 61), to_data }),
        2 => (0..VAS).prop_map(|page| Op::Invlpg { page }),
        1 => any::<bool>().prop_map(|b| Op::MovCr3 { b }),
        1 => any::<bool>().prop_map(|wp| Op::SetWp { wp }),
        8 => (0..VAS, 0u64..512, 0u8..3, any::<bool>()).prop_map(|(page, o, kind, user)| Op::Access { page, offset: o * 8, kind, user }),
    ]
}

/// Guest memory as it was at one moment (the tables and the data).
#[derive(Clone, PartialEq)]
struct Snapshot(Vec<u64>);

impl PtMemory for Snapshot {
    type Error = ();
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, ()> {
        assert_eq!(size, EntrySize::Eight);
        Ok(self.0.get((gpa.raw() / 8) as usize).copied().unwrap_or(0))
    }
    fn cmpxchg_entry(&self, _: Gpa, _: EntrySize, _: u64, _: u64) -> Result<Result<(), u64>, ()> {
        unreachable!("peek never writes")
    }
}

fn snapshot(mem: &GuestMemory) -> Snapshot {
    Snapshot((0..SNAP / 8).map(|i| mem.read_u64(Gpa::new(i * 8)).unwrap()).collect())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Fault(u32),
    Gp,
    Gpa(u64),
}

fn seen(r: AccessResult) -> Seen {
    match r {
        AccessResult::Done { gpa, .. } => Seen::Gpa(gpa.raw()),
        AccessResult::Fault(GuestFault::PageFault { error_code, .. }) => Seen::Fault(error_code.bits()),
        AccessResult::Fault(GuestFault::GeneralProtection) => Seen::Gp,
        AccessResult::DirtyRingFull => panic!("no dirty ring here"),
        AccessResult::VmExit(e) => panic!("no L1 hypervisor here: {e:?}"),
    }
}

fn regs(wp: bool) -> ControlRegs {
    let mut cr0 = Cr0::PE | Cr0::PG;
    cr0.set(Cr0::WP, wp);
    ControlRegs {
        cr0,
        cr4: Cr4::PAE,
        efer: Efer::LME | Efer::LMA | Efer::NXE,
    }
}

fn reference(mem: &Snapshot, wp: bool, cr3: u64, va: u64, access: Access) -> Seen {
    let features = CpuFeatures::default();
    let paging = GuestPaging::new(&regs(wp), &features);
    match paging.peek(mem, &Root::Table(Gpa::new(cr3)), Gva::new(va), access, 0) {
        Ok(w) => Seen::Gpa(w.gpa.raw()),
        Err(WalkError::PageFault(pf)) => Seen::Fault(pf.error_code.bits()),
        Err(WalkError::NonCanonical) => Seen::Gp,
        Err(WalkError::Memory { .. }) => unreachable!(),
    }
}

/// Sets up the guest's tables (by the VMM, before the guest runs).
fn build(mem: &GuestMemory) {
    let w = |gpa: u64, v: u64| mem.write_u64(Gpa::new(gpa), v).unwrap();
    let table = 0x7; // P, R/W, U/S
    w(PML4_A, PDPT | table);
    w(PML4_B, PDPT | table);
    w(PDPT, PD | table);
    w(PD, PT | table);
    w(PD + 8, PT_SELF | table);
    // The guest's own tables, supervisor read-write, at va 2 MiB + gpa.
    for f in 0..(SNAP / 0x1000) {
        w(PT_SELF + 8 * f, (f * 0x1000) | 0x3);
    }
    // The edited table starts with data pages mapped user read-write.
    for i in 0..VAS {
        w(PT + 8 * i, (DATA + i * 0x1000) | 0x7);
    }
}

struct Model {
    wp: bool,
    cr3: u64,
    /// Per va page: the memory states since its last flush (a TLB entry
    /// may have been made from each).
    cached: Vec<Vec<std::rc::Rc<Snapshot>>>,
}

fn run(ops: &[Op], shadow: bool) -> Result<(), TestCaseError> {
    let features = CpuFeatures::default();
    let mut audit: Box<dyn Fn() -> Vec<String>> = Box::new(Vec::new);
    let (mem, mut v, _keep): (GuestMemory, Vcpu, Box<dyn std::any::Any>) = if shadow {
        let vm = ShadowVm::new(1 << 20, Hva::new(0x4000_0000), VmaFlags::WRITE).unwrap();
        let v = Vcpu::new_shadow(vm.mmu.clone(), vm.slots.clone(), features, 1);
        let mmu = vm.mmu.clone();
        audit = Box::new(move || mmu.audit().iter().map(ToString::to_string).collect());
        (vm.memory(), v, Box::new(vm))
    } else {
        let vm = Vm::new(1 << 20, Hva::new(0x4000_0000), VmaFlags::WRITE, TdpConfig::default()).unwrap();
        let v = Vcpu::new(vm.mmu.clone(), vm.slots.clone(), features, 1).unwrap();
        (vm.memory(), v, Box::new(vm))
    };
    build(&mem);
    let mut m = Model {
        wp: true,
        cr3: PML4_A,
        cached: vec![Vec::new(); VAS as usize],
    };
    v.set_state(regs(true), PML4_A, 0).unwrap();
    for (step, op) in ops.iter().enumerate() {
        // The state before this step could have been cached by every page.
        let state = std::rc::Rc::new(snapshot(&mem));
        for list in &mut m.cached {
            if list.last().is_none_or(|last| **last != *state) {
                list.push(state.clone());
            }
        }
        // A guest store (to its tables) or an access: judged the same way.
        let (va, access, value) = match *op {
            Op::WritePte { index, value } => (PT_VA + 8 * index, Access::new(AccessKind::Write, 0, false), value),
            Op::WritePde { flags, to_data } => {
                let target = if to_data { DATA } else { PT };
                (0x20_0000 + PD, Access::new(AccessKind::Write, 0, false), target | flags)
            }
            Op::Access {
                page,
                offset,
                kind,
                user,
            } => {
                let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][kind as usize];
                (
                    page * 0x1000 + offset,
                    Access::new(kind, if user { 3 } else { 0 }, false),
                    0xabcd,
                )
            }
            Op::Invlpg { page } => {
                v.invlpg(Gva::new(page * 0x1000));
                m.cached[page as usize].clear();
                continue;
            }
            Op::MovCr3 { b } => {
                m.cr3 = if b { PML4_B } else { PML4_A };
                v.mov_cr3(m.cr3).unwrap();
                m.cached.iter_mut().for_each(Vec::clear);
                continue;
            }
            Op::SetWp { wp } => {
                m.wp = wp;
                v.set_cr0_wp(wp);
                continue;
            }
        };
        let now = snapshot(&mem);
        let fresh = reference(&now, m.wp, m.cr3, va, access);
        let got = seen(
            v.access(
                Gva::new(va),
                Access::new(access.kind, if access.is_user() { 3 } else { 0 }, false),
                8,
                value,
            )
            .unwrap(),
        );
        let page = (va >> 12) as usize;
        let tracked = page < VAS as usize;
        let stale_ok = tracked
            && m.cached[page].iter().any(|old| {
                let s = reference(old, m.wp, m.cr3, va, access);
                matches!(s, Seen::Gpa(_)) && s == got
            });
        prop_assert!(
            got == fresh || stale_ok,
            "step {step} {op:?} ({} MMU): got {got:x?}, the walker says {fresh:x?} (stale translations allowed: {})",
            if shadow { "shadow" } else { "TDP" },
            if tracked { m.cached[page].len() } else { 0 }
        );
        let violations = audit();
        prop_assert!(
            violations.is_empty(),
            "step {step} {op:?}: the MMU's audit: {violations:?}"
        );
        if tracked && got == fresh && matches!(got, Seen::Fault(_)) {
            // A #PF removes the page's TLB entries (SDM 4.10.4.1).
            m.cached[page].clear();
        }
    }
    Ok(())
}

/// The sequence that shows an unsync page's stale SPTE: a translation is
/// made, the guest edits its PTE (the 4K table goes unsync, the store is
/// not trapped), then flushes the page.
fn edit_then_flush(flush: Op) -> Vec<Op> {
    vec![
        Op::Access {
            page: 5,
            offset: 0,
            kind: 0,
            user: false,
        },
        Op::WritePte {
            index: 5,
            value: (DATA + 0x1000) | 0x7,
        },
        flush,
        Op::Access {
            page: 5,
            offset: 0,
            kind: 0,
            user: false,
        },
    ]
}

#[test]
fn a_flush_after_an_unsync_edit_shows_the_edit() {
    // INVLPG; a CR3 reload; a switch to the other address space (whose
    // new root links the unsync table's page at a new place).
    for flush in [Op::Invlpg { page: 5 }, Op::MovCr3 { b: false }, Op::MovCr3 { b: true }] {
        run(&edit_then_flush(flush), true).unwrap();
    }
}

/// The checker can fail: with syncs switched off (an injected bug), the
/// same sequences show the stale translation and are caught.
#[cfg(feature = "shuttle")]
#[test]
fn the_model_catches_a_shadow_mmu_that_does_not_sync() {
    use vmmu::sync::{Bug, with_bugs};
    for flush in [Op::Invlpg { page: 5 }, Op::MovCr3 { b: false }] {
        let r = with_bugs(&[Bug::SkipUnsyncSync], || run(&edit_then_flush(flush.clone()), true));
        assert!(r.is_err(), "{flush:?}: a stale translation went unnoticed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn shadow_mmu_behaves_as_x86(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops, true)?;
    }

    #[test]
    fn tdp_mmu_behaves_as_x86(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops, false)?;
    }
}
