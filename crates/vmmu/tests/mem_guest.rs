//! Memslots (updates, typed errors that change nothing, lookups), dirty
//! logging through the guest-memory API, and the guest-memory API itself
//! (cross-page and cross-slot accesses, `PtMemory`, rust-vmm `Bytes`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vmmu::addr::{Gfn, Gpa, Hva, Level, PAGE_SIZE};
use vmmu::host::{FrameArena, HostAddressSpace, HostFault};
use vmmu::mem::{
    DirtyRing, GuestMemory, GuestMemoryError, MemoryRegion, Memslot, MemslotChange, MemslotConfig, MemslotError,
    MemslotFlags, MemslotObserver, MemslotTable, SlotCache, mark_page_dirty_in_slot,
};
use vmmu::walker::{EntrySize, PtMemory};

const MB: u64 = 1 << 20;

fn region(id: u16, gpa: u64, size: u64, hva: u64) -> MemoryRegion {
    MemoryRegion {
        as_id: 0,
        id,
        flags: MemslotFlags::empty(),
        guest_phys_addr: Gpa::new(gpa),
        memory_size: size,
        userspace_addr: Hva::new(hva),
    }
}

fn vm(config: MemslotConfig) -> GuestMemory {
    let arena = Arc::new(FrameArena::with_reserve(2 << 30).unwrap());
    let host = Arc::new(HostAddressSpace::new(arena).unwrap());
    host.mmap(Hva::new(0x1000_0000), 64 * MB, vmmu::host::VmaFlags::WRITE)
        .unwrap();
    GuestMemory::new(host, Arc::new(MemslotTable::new(config)))
}

fn snapshot(t: &MemslotTable) -> Vec<(u16, Gfn, u64, Hva, MemslotFlags)> {
    t.load(0)
        .iter()
        .map(|s| (s.id(), s.base_gfn(), s.npages(), s.userspace_addr(), s.flags()))
        .collect()
}

#[test]
fn bad_memslots_are_typed_errors_and_change_nothing() {
    let t = MemslotTable::new(MemslotConfig {
        gpa_bits: 36,
        ..MemslotConfig::default()
    });
    t.create(region(1, 0x10_0000, MB, 0x1000_0000)).unwrap();
    t.create(region(2, 0x40_0000, MB, 0x2000_0000)).unwrap();
    let before = snapshot(&t);
    let generation = t.generation(0);
    let cases: Vec<(MemslotError, Result<u64, MemslotError>)> = vec![
        (
            MemslotError::Overlap {
                id: 3,
                start: Gfn::new(0x180),
                end: Gfn::new(0x280),
                other: 1,
                other_start: Gfn::new(0x100),
                other_end: Gfn::new(0x200),
            },
            t.create(region(3, 0x18_0000, MB, 0x3000_0000)),
        ),
        (
            MemslotError::ZeroSize { id: 3 },
            t.create(region(3, 0x80_0000, 0, 0x3000_0000)),
        ),
        (
            MemslotError::Unaligned {
                id: 3,
                what: "guest_phys_addr",
                value: 0x80_0010,
            },
            t.create(region(3, 0x80_0010, MB, 0x3000_0000)),
        ),
        (
            MemslotError::Unaligned {
                id: 3,
                what: "userspace_addr",
                value: 0x3000_0001,
            },
            t.create(region(3, 0x80_0000, MB, 0x3000_0001)),
        ),
        (
            MemslotError::Unaligned {
                id: 3,
                what: "memory_size",
                value: MB + 1,
            },
            t.create(region(3, 0x80_0000, MB + 1, 0x3000_0000)),
        ),
        (
            MemslotError::GpaBeyondWidth {
                id: 3,
                end: (1 << 36) + MB,
                bits: 36,
            },
            t.create(region(3, 1 << 36, MB, 0x3000_0000)),
        ),
        (
            MemslotError::SlotExists { as_id: 0, id: 1 },
            t.create(region(1, 0x80_0000, MB, 0x3000_0000)),
        ),
        (MemslotError::UnknownSlot { as_id: 0, id: 9 }, t.delete(0, 9)),
        (
            MemslotError::UnknownSlot { as_id: 0, id: 9 },
            t.move_slot(0, 9, Gpa::new(0)),
        ),
        (
            MemslotError::Overlap {
                id: 2,
                start: Gfn::new(0x100),
                end: Gfn::new(0x200),
                other: 1,
                other_start: Gfn::new(0x100),
                other_end: Gfn::new(0x200),
            },
            t.move_slot(0, 2, Gpa::new(0x10_0000)),
        ),
        (MemslotError::InvalidAddressSpace { as_id: 2 }, t.delete(2, 1)),
        (
            MemslotError::ReadOnlyFlagChange { id: 1 },
            t.update_flags(0, 1, MemslotFlags::READONLY),
        ),
        (
            MemslotError::DirtyLogDisabled { as_id: 0, id: 1 },
            t.get_dirty_log(0, 1).map(|_| 0),
        ),
        (
            MemslotError::ManualProtectDisabled,
            t.clear_dirty_log(0, 1, 0, &[1]).map(|_| 0),
        ),
    ];
    for (want, got) in cases {
        assert_eq!(got, Err(want.clone()), "{want}");
        assert!(!want.to_string().is_empty());
    }
    assert_eq!(snapshot(&t), before, "nothing changed");
    assert_eq!(t.generation(0), generation, "no generation bump on error");
}

#[derive(Default)]
struct Observer {
    log: parking_lot::Mutex<Vec<String>>,
}

impl MemslotObserver for Observer {
    fn flush_memslot(&self, slot: &Memslot) {
        assert!(slot.is_invalid());
        self.log.lock().push(format!("flush {}", slot.id()));
    }
    fn commit(&self, change: MemslotChange, _: Option<&Memslot>, _: Option<&Memslot>, generation: u64) {
        assert_eq!(generation & vmmu::mem::memslot::MEMSLOT_GEN_UPDATE_IN_PROGRESS, 0);
        self.log.lock().push(format!("{change:?} {generation}"));
    }
}

#[test]
fn updates_move_delete_flags_with_generations_and_observers() {
    let t = MemslotTable::default();
    let obs = Arc::new(Observer::default());
    t.register_observer(obs.clone());
    assert_eq!(
        t.set_memory_region(region(1, 0, 2 * MB, 0x1000_0000)).unwrap(),
        Some((MemslotChange::Create, 2))
    );
    let mut r = region(1, 4 * MB, 2 * MB, 0x1000_0000);
    assert_eq!(t.set_memory_region(r).unwrap(), Some((MemslotChange::Move, 6)));
    let m = t.load(0);
    assert_eq!(
        m.lookup(Gfn::new(0x400)).unwrap().gfn_to_hva(Gfn::new(0x401)),
        Some(Hva::new(0x1000_1000))
    );
    assert!(m.lookup(Gfn::new(0)).is_none());
    drop(m);
    r.flags = MemslotFlags::LOG_DIRTY_PAGES;
    assert_eq!(t.set_memory_region(r).unwrap(), Some((MemslotChange::FlagsOnly, 8)));
    assert_eq!(t.set_memory_region(r).unwrap(), None);
    r.memory_size = 0;
    assert_eq!(t.set_memory_region(r).unwrap(), Some((MemslotChange::Delete, 12)));
    assert!(t.load(0).is_empty());
    assert_eq!(
        *obs.log.lock(),
        ["Create 2", "flush 1", "Move 6", "FlagsOnly 8", "flush 1", "Delete 12"]
    );
    // The SMM address space is separate, with odd generations.
    let mut smm = region(1, 0, MB, 0x2000_0000);
    smm.as_id = 1;
    assert_eq!(t.create(smm).unwrap(), 3);
    assert!(t.load(0).is_empty());
}

#[test]
fn lookup_is_logarithmic_and_the_cache_hits() {
    let t = MemslotTable::default();
    for i in 0..512u16 {
        t.create(region(
            i,
            u64::from(i) * 4 * MB,
            2 * MB,
            0x1000_0000 + u64::from(i) * 2 * MB,
        ))
        .unwrap();
    }
    let m = t.load(0);
    let mut cache = SlotCache::default();
    for i in 0..512u64 {
        let g = Gfn::new(i * 1024 + 7);
        assert_eq!(m.lookup(g).map(|s| s.id()), Some(i as u16));
        assert_eq!(m.lookup_cached(g, &mut cache).map(|s| s.id()), Some(i as u16));
        assert!(m.lookup(Gfn::new(i * 1024 + 600)).is_none(), "gap between slots");
    }
}

#[test]
fn guest_writes_log_dirty_pages_and_dirty_log_apis() {
    let mem = vm(MemslotConfig {
        manual_dirty_log_protect: true,
        ..MemslotConfig::default()
    });
    let t = mem.memslots().clone();
    let mut r = region(0, 0, 4 * MB, 0x1000_0000);
    r.flags = MemslotFlags::LOG_DIRTY_PAGES;
    t.create(r).unwrap();
    mem.write(Gpa::new(0x1ffe), &[1, 2, 3, 4]).unwrap(); // pages 1 and 2
    mem.write_u32(Gpa::new(0x31_0000), 5).unwrap(); // page 0x310
    mem.read_u64(Gpa::new(0x5000)).unwrap(); // a read dirties nothing
    assert_eq!(mem.cmpxchg_u64(Gpa::new(0x7000), 1, 2).unwrap(), Err(0));
    assert_eq!(mem.cmpxchg_u64(Gpa::new(0x8000), 0, 2).unwrap(), Ok(()));
    let log = t.get_dirty_log(0, 0).unwrap();
    assert_eq!(log[0], 0b1_0000_0110, "pages 1, 2, and 8 (successful cmpxchg)");
    assert_eq!(log[0x310 / 64], 1 << (0x310 % 64));
    // Manual protect: get does not clear; clear does, and says what it cleared.
    assert_eq!(t.get_dirty_log(0, 0).unwrap(), log);
    assert_eq!(t.clear_dirty_log(0, 0, 0, &[0b110 | 1 << 9]).unwrap(), vec![0b110]);
    assert_eq!(t.get_dirty_log(0, 0).unwrap()[0], 1 << 8);
    assert!(matches!(
        t.clear_dirty_log(0, 0, 32, &[1]),
        Err(MemslotError::BadClearRange { .. })
    ));
    // The ring path of mark_page_dirty_in_slot.
    let ring = DirtyRing::new(128);
    let slot = t.load(0).by_id(0).unwrap().clone();
    assert_eq!(mark_page_dirty_in_slot(&slot, Gfn::new(3), Some(&ring)), Ok(false));
    let mut fetch = 0;
    assert_eq!(ring.harvest(&mut fetch)[0].offset, 3);
    // Initially-set bitmaps, and disabling logging drops the bitmap.
    let set = MemslotTable::new(MemslotConfig {
        dirty_log_initially_set: true,
        ..MemslotConfig::default()
    });
    let mut r2 = region(0, 0, MB, 0x1000_0000);
    r2.flags = MemslotFlags::LOG_DIRTY_PAGES;
    set.create(r2).unwrap();
    assert_eq!(set.get_dirty_log(0, 0).unwrap(), vec![u64::MAX; 4]);
    assert_eq!(set.get_dirty_log(0, 0).unwrap(), vec![0; 4], "cleared by get");
    set.update_flags(0, 0, MemslotFlags::empty()).unwrap();
    assert!(matches!(
        set.get_dirty_log(0, 0),
        Err(MemslotError::DirtyLogDisabled { .. })
    ));
}

#[test]
fn accesses_cross_pages_and_slots_and_respect_protections() {
    let mem = vm(MemslotConfig::default());
    let t = mem.memslots().clone();
    // Two adjacent slots backed by non-adjacent host memory, then a gap,
    // then a read-only slot.
    t.create(region(0, 0, MB, 0x1000_0000)).unwrap();
    t.create(region(1, MB, MB, 0x1100_0000)).unwrap();
    let mut ro = region(2, 4 * MB, MB, 0x1200_0000);
    ro.flags = MemslotFlags::READONLY;
    t.create(ro).unwrap();
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let at = Gpa::new(MB - 5000);
    mem.write(at, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    mem.read(at, &mut back).unwrap();
    assert_eq!(back, data, "across pages and the slot boundary");
    let mut head = [0u8; 4];
    mem.host().read(Hva::new(0x1100_0000), &mut head).unwrap();
    assert_eq!(head, [data[5000], data[5001], data[5002], data[5003]]);
    // Into the gap: refused before anything is written.
    let before = mem.read_u64(Gpa::new(2 * MB - 8)).unwrap();
    let e = mem.write(Gpa::new(2 * MB - 8), &[0xff; 16]).unwrap_err();
    assert!(
        matches!(e, GuestMemoryError::GpaNotMapped { gpa } if gpa == Gpa::new(2 * MB)),
        "{e}"
    );
    assert_eq!(mem.read_u64(Gpa::new(2 * MB - 8)).unwrap(), before);
    // Read-only slot: reads fine, writes refused.
    assert_eq!(mem.read_u32(Gpa::new(4 * MB)).unwrap(), 0);
    assert!(matches!(
        mem.write_u8(Gpa::new(4 * MB + 1), 1),
        Err(GuestMemoryError::ReadOnlyMemslot { slot_id: 2, .. })
    ));
    assert!(matches!(
        mem.cmpxchg_u32(Gpa::new(4 * MB + 2), 0, 1),
        Err(GuestMemoryError::Misaligned { .. })
    ));
    // Host mprotect read-only: the host fault surfaces.
    mem.host().mprotect(Hva::new(0x1000_0000), PAGE_SIZE, false).unwrap();
    assert!(matches!(
        mem.write_u8(Gpa::new(10), 1),
        Err(GuestMemoryError::Host {
            source: HostFault::WriteProtected { .. },
            ..
        })
    ));
    assert_eq!(mem.read_u8(Gpa::new(10)).unwrap(), 0);
    // KSM-merged pages split on a guest write.
    let host = mem.host();
    host.mprotect(Hva::new(0x1000_0000), PAGE_SIZE, true).unwrap();
    mem.write_u64(Gpa::new(0x3000), 42).unwrap();
    mem.write_u64(Gpa::new(0x4000), 42).unwrap();
    assert!(host.ksm_merge(Hva::new(0x1000_3000), Hva::new(0x1000_4000)).unwrap());
    mem.write_u64(Gpa::new(0x4000), 43).unwrap();
    assert_eq!(mem.read_u64(Gpa::new(0x3000)).unwrap(), 42);
    assert_eq!(mem.read_u64(Gpa::new(0x4000)).unwrap(), 43);
    assert_eq!(host.stats().cow_breaks, 1);
    assert_eq!(mem.gpa_to_hva(Gpa::new(MB + 3)), Some(Hva::new(0x1100_0003)));
}

#[test]
fn pt_memory_and_vm_memory_bytes() {
    let mem = vm(MemslotConfig::default());
    mem.memslots().create(region(0, 0, MB, 0x1000_0000)).unwrap();
    mem.write_u64(Gpa::new(0x1008), 0x27).unwrap();
    assert_eq!(mem.read_entry(Gpa::new(0x1008), EntrySize::Eight).unwrap(), 0x27);
    assert_eq!(mem.read_entry(Gpa::new(0x100c), EntrySize::Four).unwrap(), 0);
    assert_eq!(
        mem.cmpxchg_entry(Gpa::new(0x1008), EntrySize::Eight, 0x27, 0x67)
            .unwrap(),
        Ok(())
    );
    assert_eq!(
        mem.cmpxchg_entry(Gpa::new(0x1008), EntrySize::Eight, 0x27, 0x0)
            .unwrap(),
        Err(0x67)
    );
    assert_eq!(
        mem.cmpxchg_entry(Gpa::new(0x100c), EntrySize::Four, 0, 5).unwrap(),
        Ok(())
    );
    assert_eq!(mem.read_u64(Gpa::new(0x1008)).unwrap(), 0x5_0000_0067);
    assert!(matches!(
        mem.read_entry(Gpa::new(2 * MB), EntrySize::Eight),
        Err(GuestMemoryError::GpaNotMapped { .. })
    ));
    // rust-vmm Bytes.
    let b: &dyn Fn(&GuestMemory) = &|m| {
        m.write_obj(0xABCDu16, GuestAddress(0x2001)).unwrap();
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x2001)).unwrap(), 0xABCD);
        assert_eq!(
            Bytes::write(m, &[9; 16], GuestAddress(MB - 8)).unwrap(),
            8,
            "partial at the end"
        );
        assert!(Bytes::read_slice(m, &mut [0; 16], GuestAddress(MB - 8)).is_err());
        m.store(77u32, GuestAddress(0x3000), Ordering::Release).unwrap();
        assert_eq!(m.load::<u32>(GuestAddress(0x3000), Ordering::Acquire).unwrap(), 77);
        assert!(m.load::<u32>(GuestAddress(0x3001), Ordering::Acquire).is_err());
        let mut src: &[u8] = b"volatile";
        assert_eq!(m.read_volatile_from(GuestAddress(0x4000), &mut src, 8).unwrap(), 8);
        let mut out = Vec::new();
        m.write_all_volatile_to(GuestAddress(0x4000), &mut out, 8).unwrap();
        assert_eq!(out, b"volatile");
    };
    b(&mem);
}

#[test]
fn max_mapping_level_combines_slot_limits() {
    let t = MemslotTable::default();
    t.create(region(0, 0x20_0000, 0x8000_0000, 0x4020_0000)).unwrap();
    let s = t.load(0).by_id(0).unwrap().clone();
    assert_eq!(
        s.max_mapping_level(Gfn::new(0x200), Level::L3),
        Level::L2,
        "1G head unaligned"
    );
    assert_eq!(s.max_mapping_level(Gfn::new(0x4_0000), Level::L3), Level::L3);
    assert_eq!(s.max_mapping_level(Gfn::new(0x4_0000), Level::L2), Level::L2);
    assert_eq!(
        vmmu::mem::max_mapping_level(&s, Gfn::new(0x4_0000), Level::L1),
        Level::L1
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Random creates and deletes: the table matches a reference list,
    /// lookups agree with a linear scan, and refused updates change nothing.
    #[test]
    fn memslot_table_matches_a_reference(ops in prop::collection::vec((0u16..6, 0u64..64, 1u64..8, any::<bool>()), 1..40)) {
        let t = MemslotTable::default();
        let mut model: Vec<(u16, u64, u64)> = Vec::new(); // id, first page (of 64K units), pages
        for (id, start, len, create) in ops {
            let before = snapshot(&t);
            let res = if create {
                t.create(region(id, start * 0x1_0000, len * 0x1_0000, 0x1000_0000 + start * 0x1_0000))
            } else {
                t.delete(0, id)
            };
            let overlap = model.iter().any(|&(i, s, l)| i != id && s < start + len && start < s + l);
            let exists = model.iter().any(|&(i, ..)| i == id);
            match (create, exists, overlap) {
                (true, false, false) => { prop_assert!(res.is_ok()); model.push((id, start, len)); }
                (false, true, _) => { prop_assert!(res.is_ok()); model.retain(|&(i, ..)| i != id); }
                _ => { prop_assert!(res.is_err()); prop_assert_eq!(snapshot(&t), before); }
            }
            let m = t.load(0);
            prop_assert_eq!(m.len(), model.len());
            for g in (0..80u64).map(|p| Gfn::new(p * 16 + 3)) {
                let want = model.iter().find(|&&(_, s, l)| g.raw() >= s * 16 && g.raw() < (s + l) * 16).map(|e| e.0);
                prop_assert_eq!(m.lookup(g).map(|s| s.id()), want);
            }
        }
    }
}
