//! Walker tests, written from the x86 point of view (SDM vol. 3A ch. 4).

use crate::addr::Gva;
use std::cell::Cell;

use proptest::prelude::*;

use super::*;
use crate::arch::perm::{AccessKind, Privilege};
use crate::arch::pte::*;

const P: u64 = PT_PRESENT;
const W: u64 = PT_WRITABLE;
const U: u64 = PT_USER;
const A: u64 = PT_ACCESSED;
const D: u64 = PT_DIRTY;
const PS: u64 = PT_PAGE_SIZE;
const NX: u64 = PT64_NX;

fn regs(mode: PagingMode, cr0: Cr0, cr4: Cr4, efer: Efer) -> ControlRegs {
    let mut cr4 = cr4;
    let mut efer = efer;
    if mode.has_pae() {
        cr4 |= Cr4::PAE;
    }
    if mode == PagingMode::Level5 {
        cr4 |= Cr4::LA57;
    }
    if mode.is_long() {
        efer |= Efer::LME | Efer::LMA;
    }
    ControlRegs {
        cr0: cr0 | Cr0::PG | Cr0::PE,
        cr4,
        efer,
    }
}

fn lm4(cr0: Cr0, cr4: Cr4, efer: Efer) -> GuestPaging {
    GuestPaging::new(
        &regs(PagingMode::Level4, cr0, cr4, efer),
        &CpuFeatures::default().with_maxphyaddr(40),
    )
}

fn read(cpl: u8) -> Access {
    Access::new(AccessKind::Read, cpl, false)
}
fn write(cpl: u8) -> Access {
    Access::new(AccessKind::Write, cpl, false)
}
fn fetch(cpl: u8) -> Access {
    Access::new(AccessKind::Fetch, cpl, false)
}

/// A 4-level address space: root at 0x1000, tables at 0x2000, 0x3000,
/// 0x4000; `va` 0x40_0000_1234 (indexes 0, 1, 0, 1) maps frame 0x10_0000
/// with leaf flags `leaf`, upper levels `upper`.
fn four_level(upper: u64, leaf: u64) -> (SparseMemory, Root, u64) {
    let mem = SparseMemory::new();
    let va = (1u64 << 30) | (1 << 12) | 0x234;
    mem.write_uint(Gpa::new(0x1000), 8, 0x2000 | upper);
    mem.write_uint(Gpa::new(0x2000 + 8), 8, 0x3000 | upper);
    mem.write_uint(Gpa::new(0x3000), 8, 0x4000 | upper);
    mem.write_uint(Gpa::new(0x4000 + 8), 8, 0x1000_0000 | leaf);
    (mem, Root::Table(Gpa::new(0x1000)), va)
}

fn entry(mem: &SparseMemory, gpa: u64) -> u64 {
    mem.read_uint(Gpa::new(gpa), 8)
}

#[test]
fn successful_read_sets_accessed_on_every_level_and_no_dirty() {
    let (mem, root, va) = four_level(P | W | U, P | W | U);
    let w = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
        .walk(&mem, &root, Gva::new(va), read(3), 0)
        .unwrap();
    assert_eq!(w.gpa, Gpa::new(0x1000_0234));
    assert_eq!(w.level, 1);
    assert_eq!(w.page_size, PageSize::Size4K);
    assert_eq!(w.rights, AccessRights::all());
    for gpa in [0x1000, 0x2008, 0x3000] {
        assert_eq!(entry(&mem, gpa) & (A | D), A, "entry {gpa:#x}");
    }
    assert_eq!(entry(&mem, 0x4008) & (A | D), A);
    assert!(!w.dirty);
    // The walk records each level's table and entry.
    assert_eq!(w.entry(4).unwrap().table_gfn, Gfn::new(1));
    assert_eq!(w.entry(1).unwrap().pte_gpa, Gpa::new(0x4008));
    assert_eq!(w.entry(1).unwrap().table_gfn, Gfn::new(4));
}

#[test]
fn successful_write_sets_dirty_on_the_leaf_only() {
    let (mem, root, va) = four_level(P | W | U, P | W | U);
    let w = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
        .walk(&mem, &root, Gva::new(va), write(3), 0)
        .unwrap();
    assert!(w.dirty);
    for gpa in [0x1000, 0x2008, 0x3000] {
        assert_eq!(entry(&mem, gpa) & D, 0, "no D on a non-leaf");
    }
    assert_eq!(entry(&mem, 0x4008) & (A | D), A | D);
}

#[test]
fn faulting_walk_changes_nothing() {
    let (mem, root, va) = four_level(P | W | U, P | U);
    let err = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
        .walk(&mem, &root, Gva::new(va), write(3), 0)
        .unwrap_err();
    assert_eq!(
        err.error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER)
    );
    for gpa in [0x1000, 0x2008, 0x3000, 0x4008] {
        assert_eq!(entry(&mem, gpa) & (A | D), 0);
    }
}

#[test]
fn not_present_at_each_level_reports_that_level() {
    for (level, gpa) in [(4u8, 0x1000u64), (3, 0x2008), (2, 0x3000), (1, 0x4008)] {
        let (mem, root, va) = four_level(P | W | U, P | W | U);
        mem.write_uint(Gpa::new(gpa), 8, 0xdead_b000); // P = 0, other bits ignored
        let err = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
            .walk(&mem, &root, Gva::new(va), write(3), 0)
            .unwrap_err();
        match err {
            WalkError::PageFault(pf) => {
                assert_eq!(pf.error_code, PfErrorCode::WRITE | PfErrorCode::USER);
                assert_eq!(pf.level, level);
                assert_eq!(pf.pte_gpa, Gpa::new(gpa));
            }
            other => panic!("expected #PF, got {other:?}"),
        }
    }
}

#[test]
fn reserved_bits_report_rsvd_with_present() {
    let (mem, root, va) = four_level(P | W | U, P | W | U | (1 << 45));
    let err = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
        .walk(&mem, &root, Gva::new(va), read(0), 0)
        .unwrap_err();
    assert_eq!(err.error_code(), Some(PfErrorCode::PRESENT | PfErrorCode::RSVD));
    // A not-present entry is never checked for reserved bits.
    let (mem, root, va) = four_level(P | W | U, (1 << 45) | W);
    let err = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
        .walk(&mem, &root, Gva::new(va), read(0), 0)
        .unwrap_err();
    assert_eq!(err.error_code(), Some(PfErrorCode::empty()));
}

#[test]
fn execute_disable_needs_efer_nxe() {
    let (mem, root, va) = four_level(P | W | U, P | W | U | NX);
    let err = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
        .walk(&mem, &root, Gva::new(va), fetch(3), 0)
        .unwrap_err();
    assert_eq!(
        err.error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::USER | PfErrorCode::FETCH)
    );
    // Reads are fine.
    assert!(
        lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
            .walk(&mem, &root, Gva::new(va), read(3), 0)
            .is_ok()
    );
    // Without NXE, bit 63 is reserved, and I/D is not reported without SMEP.
    let err = lm4(Cr0::WP, Cr4::empty(), Efer::empty())
        .walk(&mem, &root, Gva::new(va), fetch(3), 0)
        .unwrap_err();
    assert_eq!(
        err.error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::USER | PfErrorCode::RSVD)
    );
}

#[test]
fn fetch_reports_id_only_with_nx_or_smep() {
    // 32-bit paging: no NX at all; I/D only with SMEP.
    let mem = SparseMemory::new();
    mem.write_uint(Gpa::new(0x1000), 4, 0x2000 | P); // supervisor table
    mem.write_uint(Gpa::new(0x2000), 4, 0x5000 | P | U);
    let root = Root::Table(Gpa::new(0x1000));
    let f = CpuFeatures::default();
    let p = GuestPaging::new(&regs(PagingMode::Bits32, Cr0::WP, Cr4::empty(), Efer::NXE), &f);
    assert_eq!(
        p.walk(&mem, &root, Gva::new(0), fetch(3), 0).unwrap_err().error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::USER)
    );
    let p = GuestPaging::new(&regs(PagingMode::Bits32, Cr0::WP, Cr4::SMEP, Efer::empty()), &f);
    assert_eq!(
        p.walk(&mem, &root, Gva::new(0), fetch(3), 0).unwrap_err().error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::USER | PfErrorCode::FETCH)
    );
}

#[test]
fn smap_and_smep_against_user_pages() {
    let (mem, root, va) = four_level(P | W | U, P | W | U);
    let p = lm4(Cr0::WP, Cr4::SMAP | Cr4::SMEP, Efer::NXE);
    assert_eq!(
        p.walk(&mem, &root, Gva::new(va), read(0), 0).unwrap_err().error_code(),
        Some(PfErrorCode::PRESENT)
    );
    assert!(
        p.walk(&mem, &root, Gva::new(va), Access::new(AccessKind::Read, 0, true), 0)
            .is_ok()
    );
    let implicit = Access {
        kind: AccessKind::Read,
        privilege: Privilege::ImplicitSupervisor,
        rflags_ac: true,
    };
    assert_eq!(
        p.walk(&mem, &root, Gva::new(va), implicit, 0).unwrap_err().error_code(),
        Some(PfErrorCode::PRESENT)
    );
    assert_eq!(
        p.walk(&mem, &root, Gva::new(va), fetch(0), 0).unwrap_err().error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::FETCH)
    );
}

#[test]
fn user_bit_must_be_set_on_every_level() {
    let mem = SparseMemory::new();
    let root = Root::Table(Gpa::new(0x1000));
    let va2 = (1u64 << 30) | (1 << 12);
    mem.write_uint(Gpa::new(0x1000), 8, 0x2000 | P | W | U);
    mem.write_uint(Gpa::new(0x2008), 8, 0x3000 | P | W); // supervisor PDPTE
    mem.write_uint(Gpa::new(0x3000), 8, 0x4000 | P | W | U);
    mem.write_uint(Gpa::new(0x4008), 8, 0x9000 | P | W | U);
    let p = lm4(Cr0::WP, Cr4::empty(), Efer::NXE);
    assert_eq!(
        p.walk(&mem, &root, Gva::new(va2), read(3), 0).unwrap_err().error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::USER)
    );
    let w = p.walk(&mem, &root, Gva::new(va2), read(0), 0).unwrap();
    assert_eq!(w.rights, AccessRights::WRITE | AccessRights::EXEC);
    assert_eq!(w.entry(3).unwrap().rights, AccessRights::WRITE | AccessRights::EXEC);
    assert_eq!(w.entry(4).unwrap().rights, AccessRights::all());
}

#[test]
fn protection_keys() {
    // Key 5 in the leaf; PKRU AD5.
    let leaf = P | W | U | (5u64 << PT64_PKEY_SHIFT);
    let (mem, root, va) = four_level(P | W | U, leaf);
    let pkru_ad5 = 1 << 10;
    let p = lm4(Cr0::WP, Cr4::PKE, Efer::NXE);
    assert_eq!(
        p.walk(&mem, &root, Gva::new(va), read(3), pkru_ad5)
            .unwrap_err()
            .error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::USER | PfErrorCode::PK)
    );
    // Supervisor data access to a user page is checked too.
    assert_eq!(
        p.walk(&mem, &root, Gva::new(va), read(0), pkru_ad5)
            .unwrap_err()
            .error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::PK)
    );
    // Fetches are not subject to protection keys.
    assert!(p.walk(&mem, &root, Gva::new(va), fetch(3), pkru_ad5).is_ok());
    // Without CR4.PKE nothing happens.
    assert!(
        lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
            .walk(&mem, &root, Gva::new(va), read(3), pkru_ad5)
            .is_ok()
    );
    // WD5: user write denied; supervisor write only with WP.
    let pkru_wd5 = 1 << 11;
    assert!(p.walk(&mem, &root, Gva::new(va), write(3), pkru_wd5).is_err());
    assert!(
        lm4(Cr0::empty(), Cr4::PKE, Efer::NXE)
            .walk(&mem, &root, Gva::new(va), write(0), pkru_wd5)
            .is_ok()
    );
    // A PK violation combined with another one reports both.
    let (mem, root, va) = four_level(P | W | U, P | U | (5u64 << PT64_PKEY_SHIFT));
    assert_eq!(
        p.walk(&mem, &root, Gva::new(va), write(3), pkru_ad5)
            .unwrap_err()
            .error_code(),
        Some(PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER | PfErrorCode::PK)
    );
}

#[test]
fn non_canonical_is_gp_without_reading_memory() {
    let (mem, root, _) = four_level(P | W | U, P | W | U);
    mem.start_read_log();
    let p = lm4(Cr0::WP, Cr4::empty(), Efer::NXE);
    assert_eq!(
        p.walk(&mem, &root, Gva::new(0x0000_8000_0000_0000), read(0), 0),
        Err(WalkError::NonCanonical)
    );
    assert_eq!(
        p.walk(&mem, &root, Gva::new(0xfff0_0000_0000_0000), fetch(3), 0),
        Err(WalkError::NonCanonical)
    );
    assert!(mem.take_read_log().is_empty());
    // 5-level paging accepts 57-bit addresses.
    let p5 = GuestPaging::new(
        &regs(PagingMode::Level5, Cr0::WP, Cr4::empty(), Efer::NXE),
        &CpuFeatures::default(),
    );
    assert!(matches!(
        p5.walk(&mem, &root, Gva::new(0x0000_8000_0000_0000), read(0), 0),
        Err(WalkError::PageFault(_))
    ));
    assert_eq!(
        p5.walk(&mem, &root, Gva::new(0x0100_0000_0000_0000), read(0), 0),
        Err(WalkError::NonCanonical)
    );
}

#[test]
fn large_pages_2m_and_1g() {
    let (mem, root, _) = four_level(P | W | U, P | W | U);
    mem.write_uint(Gpa::new(0x3008), 8, 0x4020_0000 | P | W | PS); // PDE 1: 2 MiB
    mem.write_uint(Gpa::new(0x2010), 8, 0x8000_0000 | P | W | PS); // PDPTE 2: 1 GiB
    let p = lm4(Cr0::WP, Cr4::empty(), Efer::NXE);
    let w = p
        .walk(&mem, &root, Gva::new((1 << 30) | (1 << 21) | 0x12345), write(0), 0)
        .unwrap();
    assert_eq!(
        (w.level, w.page_size, w.gpa),
        (2, PageSize::Size2M, Gpa::new(0x4020_0000 + 0x12345))
    );
    assert_eq!(entry(&mem, 0x3008) & (A | D), A | D);
    assert_eq!(w.page_base_gfn(), Gfn::new(0x40200));
    let w = p
        .walk(&mem, &root, Gva::new((2 << 30) | 0x3456_789a), read(0), 0)
        .unwrap();
    assert_eq!(
        (w.level, w.page_size, w.gpa),
        (3, PageSize::Size1G, Gpa::new(0x8000_0000 + 0x3456_789a))
    );
    // A 2 MiB PDE with bit 13 set has a reserved bit.
    mem.write_uint(Gpa::new(0x3008), 8, 0x4020_2000 | P | W | PS);
    let err = p
        .walk(&mem, &root, Gva::new((1 << 30) | (1 << 21)), read(0), 0)
        .unwrap_err();
    assert_eq!(err.error_code(), Some(PfErrorCode::PRESENT | PfErrorCode::RSVD));
    // Without 1 GiB page support, PS in a PDPTE is reserved.
    let f = CpuFeatures {
        gbpages: false,
        ..CpuFeatures::default()
    };
    let p = GuestPaging::new(&regs(PagingMode::Level4, Cr0::WP, Cr4::empty(), Efer::NXE), &f);
    let err = p.walk(&mem, &root, Gva::new(2 << 30), read(0), 0).unwrap_err();
    assert_eq!(err.error_code(), Some(PfErrorCode::PRESENT | PfErrorCode::RSVD));
}

#[test]
fn pse_4m_pages_in_32_bit_paging() {
    let mem = SparseMemory::new();
    let pde = 0x0080_0000 | (0x7 << 13) | P | W | PS; // 4 MiB at 0x7_0080_0000
    mem.write_uint(Gpa::new(0x1000 + 4 * 5), 4, pde);
    let root = Root::Table(Gpa::new(0x1000));
    let f = CpuFeatures::default().with_maxphyaddr(40);
    let pse = GuestPaging::new(&regs(PagingMode::Bits32, Cr0::WP, Cr4::PSE, Efer::empty()), &f);
    let va = (5 << 22) | 0x12_3456;
    let w = pse.walk(&mem, &root, Gva::new(va), read(0), 0).unwrap();
    assert_eq!(
        (w.page_size, w.gpa),
        (PageSize::Size4M, Gpa::new(0x7_0080_0000 + 0x12_3456))
    );
    // PSE-36 address bits at or above MAXPHYADDR are reserved.
    let f34 = CpuFeatures::default().with_maxphyaddr(34);
    let p34 = GuestPaging::new(&regs(PagingMode::Bits32, Cr0::WP, Cr4::PSE, Efer::empty()), &f34);
    let err = p34.walk(&mem, &root, Gva::new(va), read(0), 0).unwrap_err();
    assert_eq!(err.error_code(), Some(PfErrorCode::PRESENT | PfErrorCode::RSVD));
    // Without CR4.PSE the PDE points to a page table.
    let nopse = GuestPaging::new(&regs(PagingMode::Bits32, Cr0::WP, Cr4::empty(), Efer::empty()), &f);
    let w = nopse.walk(&mem, &root, Gva::new(va), read(0), 0).unwrap_err();
    assert_eq!(w.error_code(), Some(PfErrorCode::empty())); // the 'table' is empty
}

#[test]
fn pae_pdptes_are_registers() {
    let mem = SparseMemory::new();
    // PDPT at 0x1020 (32-byte aligned), PDPTE 1 -> PD 0x2000 -> PT 0x3000.
    mem.write_uint(Gpa::new(0x1028), 8, 0x2000 | P);
    mem.write_uint(Gpa::new(0x2000), 8, 0x3000 | P | W | U);
    mem.write_uint(Gpa::new(0x3000), 8, 0x7000 | P | W | U);
    let f = CpuFeatures::default();
    let p = GuestPaging::new(&regs(PagingMode::Pae, Cr0::WP, Cr4::empty(), Efer::NXE), &f);
    let pdptes = load_pdptes(&mem, 0x1020, &f).unwrap();
    let root = p.root(0x1020, pdptes);
    let w = p.walk(&mem, &root, Gva::new(0x4000_0abc), write(3), 0).unwrap();
    assert_eq!(w.gpa, Gpa::new(0x7abc));
    assert_eq!(entry(&mem, 0x1028), 0x2000 | P, "a PDPTE is never written back");
    // Changing the PDPT in memory has no effect until the next CR3 load.
    mem.write_uint(Gpa::new(0x1028), 8, 0);
    assert!(p.walk(&mem, &root, Gva::new(0x4000_0abc), read(3), 0).is_ok());
    let root = p.root(0x1020, load_pdptes(&mem, 0x1020, &f).unwrap());
    assert_eq!(
        p.walk(&mem, &root, Gva::new(0x4000_0abc), read(3), 0)
            .unwrap_err()
            .error_code(),
        Some(PfErrorCode::USER)
    );
    // A present PDPTE with reserved bits fails the load (#GP at MOV CR3).
    mem.write_uint(Gpa::new(0x1030), 8, 0x2000 | P | W);
    assert!(matches!(
        load_pdptes(&mem, 0x1020, &f),
        Err(PdpteLoadError::Reserved { index: 2, .. })
    ));
}

#[test]
fn a_table_that_points_at_itself_terminates() {
    // PML4[0] points at the PML4: va 0 walks the same entry at every level
    // and maps the PML4 frame itself, A set by a restart-safe walk.
    let mem = SparseMemory::new();
    mem.write_uint(Gpa::new(0x1000), 8, 0x1000 | P | W | U);
    let root = Root::Table(Gpa::new(0x1000));
    let p = lm4(Cr0::WP, Cr4::empty(), Efer::NXE);
    let w = p.walk(&mem, &root, Gva::new(0x18), write(3), 0).unwrap();
    assert_eq!(w.gpa, Gpa::new(0x1018));
    assert_eq!(entry(&mem, 0x1000), 0x1000 | P | W | U | A | D);
    // The same, with every entry of the table pointing at the table.
    for i in 0..512 {
        mem.write_uint(Gpa::new(0x1000 + 8 * i), 8, 0x1000 | P | W | U);
    }
    for va in [0u64, 0x7fff_ffff_f000, 0x1234_5678_9000] {
        let w = p.walk(&mem, &root, Gva::new(va), read(3), 0).unwrap();
        assert_eq!(w.gpa.frame(), Gfn::new(1));
    }
}

/// A memory whose entry at `target` changes under the walker once, just
/// before its first compare-exchange (another vCPU's store).
struct RacingMemory {
    inner: SparseMemory,
    target: Gpa,
    replacement: u64,
    fired: Cell<bool>,
}

impl PtMemory for RacingMemory {
    type Error = std::convert::Infallible;
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        self.inner.read_entry(gpa, size)
    }
    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error> {
        if !self.fired.replace(true) {
            self.inner.write_uint(self.target, 8, self.replacement);
        }
        self.inner.cmpxchg_entry(gpa, size, old, new)
    }
}

#[test]
fn walk_restarts_when_an_entry_changes_under_it() {
    let (inner, root, va) = four_level(P | W | U, P | W | U);
    // The leaf is redirected to another frame while the walk sets A bits.
    let mem = RacingMemory {
        inner,
        target: Gpa::new(0x4008),
        replacement: 0x2222_0000 | P | W | U,
        fired: Cell::new(false),
    };
    let w = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
        .walk(&mem, &root, Gva::new(va), write(3), 0)
        .unwrap();
    assert_eq!(w.gpa, Gpa::new(0x2222_0234), "the restarted walk sees the new entry");
    assert_eq!(entry(&mem.inner, 0x4008), 0x2222_0000 | P | W | U | A | D);
}

#[test]
fn peek_has_no_side_effects() {
    let (mem, root, va) = four_level(P | W | U, P | W | U);
    let w = lm4(Cr0::WP, Cr4::empty(), Efer::NXE)
        .peek(&mem, &root, Gva::new(va), write(3), 0)
        .unwrap();
    assert_eq!(w.gpa, Gpa::new(0x1000_0234));
    for gpa in [0x1000, 0x2008, 0x3000, 0x4008] {
        assert_eq!(entry(&mem, gpa) & (A | D), 0);
    }
}

#[test]
fn ept_walk_permissions_misconfig_and_ad() {
    use crate::arch::ept::*;
    let mem = SparseMemory::new();
    let rwx = EPT_READ | EPT_WRITE | EPT_EXEC;
    mem.write_uint(Gpa::new(0x1000), 8, 0x2000 | rwx);
    mem.write_uint(Gpa::new(0x2000), 8, 0x3000 | rwx);
    mem.write_uint(Gpa::new(0x3000), 8, 0x4000 | rwx);
    mem.write_uint(Gpa::new(0x4000), 8, 0x9000 | EPT_READ | (6 << EPT_MT_SHIFT));
    let root = Root::Table(Gpa::new(0x1000));
    let f = CpuFeatures::default();
    let ept = Paging::ept(4, true, &f);
    // EPT accesses are presented as user accesses (USER = readable).
    let r = Access::new(AccessKind::Read, 3, false);
    let w = ept.walk(&mem, &root, Gva::new(0x123), r, 0).unwrap();
    assert_eq!(w.gpa, Gpa::new(0x9123));
    assert_eq!(entry(&mem, 0x4000) & (EPT_ACCESSED | EPT_DIRTY), EPT_ACCESSED);
    let err = ept
        .walk(
            &mem,
            &root,
            Gva::new(0x123),
            Access::new(AccessKind::Write, 3, false),
            0,
        )
        .unwrap_err();
    match err {
        WalkError::PageFault(pf) => {
            assert!(pf.error_code.contains(PfErrorCode::PRESENT | PfErrorCode::WRITE));
            assert_eq!(pf.rights, AccessRights::USER);
        }
        other => panic!("{other:?}"),
    }
    // Write-only is a misconfiguration (reported as RSVD).
    mem.write_uint(Gpa::new(0x4000), 8, 0x9000 | EPT_WRITE | (6 << EPT_MT_SHIFT));
    let err = ept.walk(&mem, &root, Gva::new(0x123), r, 0).unwrap_err();
    assert!(err.error_code().unwrap().contains(PfErrorCode::RSVD));
    // Without A/D enabled nothing is written.
    mem.write_uint(Gpa::new(0x4000), 8, 0x9000 | rwx | (6 << EPT_MT_SHIFT));
    let before = entry(&mem, 0x1000);
    Paging::ept(4, false, &f)
        .walk(&mem, &root, Gva::new(0x123), r, 0)
        .unwrap();
    assert_eq!(entry(&mem, 0x1000), before);
}

// ---- Properties ------------------------------------------------------------

/// A random path of four entries for one address, in a small universe of
/// table frames (so tables may repeat and point at each other).
#[derive(Clone, Debug)]
struct RandomPath {
    va: u64,
    /// Table frames for levels 4..1 (index 0 = root).
    tables: [u64; 4],
    flags: [u64; 4],
    leaf_frame: u64,
    cr0_wp: bool,
    smep: bool,
    smap: bool,
    nxe: bool,
    pke: bool,
    pkru: u32,
    access: Access,
}

fn arb_access() -> impl Strategy<Value = Access> {
    (0u8..3, 0u8..3, any::<bool>()).prop_map(|(k, p, ac)| Access {
        kind: [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][k as usize],
        privilege: [Privilege::User, Privilege::Supervisor, Privilege::ImplicitSupervisor][p as usize],
        rflags_ac: ac,
    })
}

fn arb_flags() -> impl Strategy<Value = u64> {
    // P mostly set; W, U, A, D, PS, NX, a pkey, occasionally a reserved bit.
    (any::<u16>(), 0u8..16, 0u32..20).prop_map(|(bits, pkey, rsvd)| {
        let mut f = 0u64;
        if bits & 0xf != 0 {
            f |= P;
        }
        for (bit, flag) in [(4, W), (5, U), (6, A), (7, D), (8, NX)] {
            if bits & (1 << bit) != 0 {
                f |= flag;
            }
        }
        if bits & (3 << 9) == 3 << 9 {
            f |= PS;
        }
        f |= (pkey as u64) << PT64_PKEY_SHIFT;
        if rsvd == 0 {
            f |= 1 << 45;
        }
        f
    })
}

fn arb_path() -> impl Strategy<Value = RandomPath> {
    (
        any::<u64>(),
        prop::array::uniform4(1u64..6),
        prop::array::uniform4(arb_flags()),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        any::<u32>(),
        arb_access(),
    )
        .prop_map(
            |(va, tables, flags, (wp, smep, smap, nxe, pke), pkru, access)| RandomPath {
                // A canonical 48-bit address.
                va: ((va << 16) as i64 >> 16) as u64,
                tables,
                flags,
                leaf_frame: 0x4_0000 + (va & 0xfff),
                cr0_wp: wp,
                smep,
                smap,
                nxe,
                pke,
                pkru,
                access,
            },
        )
}

impl RandomPath {
    fn build(&self) -> (SparseMemory, Root, GuestPaging) {
        let mem = SparseMemory::new();
        for i in 0..4 {
            let level = 4 - i as u8;
            let table = self.tables[i];
            let index = Pte64::index(self.va, level);
            let target = if i < 3 { self.tables[i + 1] } else { self.leaf_frame };
            let mut flags = self.flags[i];
            if level == 1 {
                flags &= !PS; // bit 7 is PAT in a PTE: keep it out of the frame.
            }
            let target_addr = if flags & PS != 0 && level > 1 {
                (target << 12) & !(Pte64::leaf_size(level) - 1)
            } else {
                target << 12
            };
            mem.write_uint(Gpa::new(table * 0x1000 + index * 8), 8, target_addr | flags);
        }
        let mut cr0 = Cr0::empty();
        cr0.set(Cr0::WP, self.cr0_wp);
        let mut cr4 = Cr4::empty();
        cr4.set(Cr4::SMEP, self.smep);
        cr4.set(Cr4::SMAP, self.smap);
        cr4.set(Cr4::PKE, self.pke);
        let mut efer = Efer::empty();
        efer.set(Efer::NXE, self.nxe);
        let p = lm4(cr0, cr4, efer);
        (mem, Root::Table(Gpa::new(self.tables[0] << 12)), p)
    }
}

/// Every entry of the five table frames a random path may use.
fn snapshot(mem: &SparseMemory) -> Vec<u64> {
    (1..6u64)
        .flat_map(|t| (0..512).map(move |i| (t, i)))
        .map(|(t, i)| mem.read_uint(Gpa::new(t * 0x1000 + i * 8), 8))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Walking twice gives the same result, and the second walk changes
    /// nothing: setting A/D is idempotent.
    #[test]
    fn accessed_dirty_updates_are_idempotent(path in arb_path()) {
        let (mem, root, p) = path.build();
        let first = p.walk(&mem, &root, Gva::new(path.va), path.access, path.pkru);
        let after_first = snapshot(&mem);
        let second = p.walk(&mem, &root, Gva::new(path.va), path.access, path.pkru);
        prop_assert_eq!(first.map(|w| w.gpa), second.map(|w| w.gpa));
        prop_assert_eq!(after_first, snapshot(&mem));
    }

    /// A faulting walk leaves memory untouched; a successful one only sets
    /// A (and D on the leaf of a write).
    #[test]
    fn walks_only_set_accessed_and_dirty(path in arb_path()) {
        let (mem, root, p) = path.build();
        let before = snapshot(&mem);
        let r = p.walk(&mem, &root, Gva::new(path.va), path.access, path.pkru);
        let after = snapshot(&mem);
        match r {
            Err(_) => prop_assert_eq!(before, after),
            Ok(w) => {
                for (b, a) in before.iter().zip(&after) {
                    prop_assert_eq!(b & !(A | D), a & !(A | D));
                }
                let leaf = w.leaf().unwrap();
                let leaf_now = mem.read_uint(leaf.pte_gpa, 8);
                prop_assert_eq!(leaf_now & D != 0, leaf.pte & D != 0 || path.access.is_write());
            }
        }
    }

    /// Every entry a walk reads is in the root table or in a table named by
    /// the entry read just before it.
    #[test]
    fn walk_reads_only_the_tables_it_names(path in arb_path()) {
        let (mem, root, p) = path.build();
        mem.start_read_log();
        let _ = p.peek(&mem, &root, Gva::new(path.va), path.access, path.pkru);
        let log = mem.take_read_log();
        prop_assert!(log.len() <= 4);
        let mut table = path.tables[0] << 12;
        for gpa in log {
            prop_assert_eq!(gpa.raw() & !0xfff, table);
            table = Pte64::table_addr(mem.read_uint(gpa, 8));
        }
    }

    /// Granting a right (R/W, or clearing XD) in any entry never turns a
    /// successful walk into a fault, nor changes where it goes.
    #[test]
    fn granting_a_right_never_removes_one(path in arb_path(), level in 0usize..4, grant_w in any::<bool>()) {
        let (mem, root, p) = path.build();
        let Ok(before) = p.peek(&mem, &root, Gva::new(path.va), path.access, path.pkru) else { return Ok(()) };
        let Some(e) = before.entry(4 - level as u8) else { return Ok(()) };
        let granted = if grant_w { e.pte | W } else { e.pte & !NX };
        mem.write_uint(e.pte_gpa, 8, granted);
        let after = p.peek(&mem, &root, Gva::new(path.va), path.access, path.pkru);
        prop_assert_eq!(after.map(|w| w.gpa), Ok(before.gpa));
    }

    /// Granting U/S never removes a right from user-mode accesses.
    #[test]
    fn granting_user_never_hurts_user_accesses(path in arb_path(), level in 0usize..4) {
        let mut path = path;
        path.access.privilege = Privilege::User;
        let (mem, root, p) = path.build();
        let Ok(before) = p.peek(&mem, &root, Gva::new(path.va), path.access, path.pkru) else { return Ok(()) };
        let Some(e) = before.entry(4 - level as u8) else { return Ok(()) };
        mem.write_uint(e.pte_gpa, 8, e.pte | U);
        prop_assert_eq!(p.peek(&mem, &root, Gva::new(path.va), path.access, path.pkru).map(|w| w.gpa), Ok(before.gpa));
    }
}

#[test]
#[should_panic(expected = "4 or 5 levels, not 3")]
fn ept_paging_of_three_levels_is_refused() {
    let _ = Paging::ept(3, false, &CpuFeatures::default());
}
