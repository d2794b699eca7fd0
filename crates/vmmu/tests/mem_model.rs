//! State-machine property test: random host operations (faults, writes,
//! THP collapse and split, migration, swap out and in, KSM merge and copy
//! on write, mprotect, munmap) and memslot changes (move, dirty logging)
//! against a reference model of the data (hva page → bytes). After every
//! step: no data lost, every frame that stopped being mapped is freed and
//! poisoned, every mapped frame is live, and the dirty log holds exactly
//! the pages the guest wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use vmmu::addr::{Gpa, Hva, PAGE_SIZE, Pfn};
use vmmu::host::{FrameArena, HostAddressSpace, HostFault, VmaFlags};
use vmmu::mem::{GuestMemory, GuestMemoryError, MemoryRegion, MemslotFlags, MemslotTable};

const MB2: u64 = 2 << 20;
const THP_BASE: u64 = 0x4000_0000;
const SMALL_BASE: u64 = 0x5000_0000;
const THP_PAGES: u16 = 1024;
const PAGES: u16 = THP_PAGES + 32;
const SLOT0_GPAS: [u64; 3] = [0, 0x100_0000, 0x4000_0000];
const SLOT1_GPA: u64 = 0x800_0000;

#[derive(Clone, Debug)]
enum Op {
    Write {
        page: u16,
        off: u16,
        len: u16,
        val: u8,
        via_guest: bool,
    },
    CopyPage {
        src: u16,
        dst: u16,
    },
    Collapse {
        block: u8,
    },
    Split {
        block: u8,
    },
    Migrate {
        page: u16,
    },
    SwapOut {
        page: u16,
    },
    SwapIn {
        page: u16,
    },
    Ksm {
        a: u16,
        b: u16,
    },
    Mprotect {
        page: u16,
        npages: u16,
        writable: bool,
    },
    Discard {
        page: u16,
    },
    MoveSlot {
        to: u8,
    },
    ToggleDirtyLog,
}

fn page() -> impl Strategy<Value = u16> {
    // Favour a few hot pages so operations meet each other.
    prop_oneof![
        0u16..PAGES,
        prop::sample::select(vec![0u16, 1, 2, 511, 512, 513, 1023, 1024, 1025])
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (page(), 0u16..4096, 1u16..64, any::<u8>(), any::<bool>()).prop_map(|(page, off, len, val, via_guest)| {
            let off = off.min(4096 - len);
            Op::Write { page, off, len, val, via_guest }
        }),
        1 => (page(), page()).prop_map(|(src, dst)| Op::CopyPage { src, dst }),
        2 => (0u8..2).prop_map(|block| Op::Collapse { block }),
        2 => (0u8..2).prop_map(|block| Op::Split { block }),
        2 => page().prop_map(|page| Op::Migrate { page }),
        2 => page().prop_map(|page| Op::SwapOut { page }),
        1 => page().prop_map(|page| Op::SwapIn { page }),
        2 => (page(), page()).prop_map(|(a, b)| Op::Ksm { a, b }),
        1 => (page(), 1u16..600, any::<bool>()).prop_map(|(page, npages, writable)| Op::Mprotect { page, npages, writable }),
        1 => page().prop_map(|page| Op::Discard { page }),
        1 => (0u8..3).prop_map(|to| Op::MoveSlot { to }),
        1 => Just(Op::ToggleDirtyLog),
    ]
}

fn hva_of(page: u16) -> Hva {
    if page < THP_PAGES {
        Hva::new(THP_BASE + u64::from(page) * PAGE_SIZE)
    } else {
        Hva::new(SMALL_BASE + u64::from(page - THP_PAGES) * PAGE_SIZE)
    }
}

fn flags_of(page: u16) -> VmaFlags {
    if page < THP_PAGES {
        VmaFlags::WRITE | VmaFlags::THP
    } else {
        VmaFlags::WRITE
    }
}

struct World {
    host: Arc<HostAddressSpace>,
    mem: GuestMemory,
    slots: Arc<MemslotTable>,
    slot0_gpa: u64,
    logging: bool,
    /// Reference data of every page ever written (others read as zero).
    data: BTreeMap<u16, Vec<u8>>,
    read_only: BTreeSet<u16>,
    dirty: BTreeSet<u64>,
}

impl World {
    fn new() -> Self {
        let arena = Arc::new(FrameArena::with_reserve(2 << 30).unwrap());
        let host = Arc::new(HostAddressSpace::new(arena).unwrap());
        host.mmap(Hva::new(THP_BASE), 2 * MB2, flags_of(0)).unwrap();
        host.mmap(Hva::new(SMALL_BASE), 32 * PAGE_SIZE, flags_of(THP_PAGES))
            .unwrap();
        let slots = Arc::new(MemslotTable::default());
        slots
            .create(MemoryRegion {
                as_id: 0,
                id: 0,
                flags: MemslotFlags::empty(),
                guest_phys_addr: Gpa::new(SLOT0_GPAS[0]),
                memory_size: 2 * MB2,
                userspace_addr: Hva::new(THP_BASE),
            })
            .unwrap();
        slots
            .create(MemoryRegion {
                as_id: 0,
                id: 1,
                flags: MemslotFlags::empty(),
                guest_phys_addr: Gpa::new(SLOT1_GPA),
                memory_size: 32 * PAGE_SIZE,
                userspace_addr: Hva::new(SMALL_BASE),
            })
            .unwrap();
        let mem = GuestMemory::new(host.clone(), slots.clone());
        Self {
            host,
            mem,
            slots,
            slot0_gpa: SLOT0_GPAS[0],
            logging: false,
            data: BTreeMap::new(),
            read_only: BTreeSet::new(),
            dirty: BTreeSet::new(),
        }
    }

    fn gpa_of(&self, page: u16) -> Gpa {
        if page < THP_PAGES {
            Gpa::new(self.slot0_gpa + u64::from(page) * PAGE_SIZE)
        } else {
            Gpa::new(SLOT1_GPA + u64::from(page - THP_PAGES) * PAGE_SIZE)
        }
    }

    fn mapped_pfns(&self) -> BTreeSet<Pfn> {
        (0..PAGES)
            .filter_map(|p| self.host.lookup(hva_of(p)).map(|l| l.pfn))
            .collect()
    }

    fn model_page(&self, page: u16) -> Vec<u8> {
        self.data
            .get(&page)
            .cloned()
            .unwrap_or_else(|| vec![0; PAGE_SIZE as usize])
    }

    fn read_page(&self, page: u16) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE as usize];
        self.host.read(hva_of(page), &mut b).unwrap();
        b
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Write {
                page,
                off,
                len,
                val,
                via_guest,
            } => {
                let bytes = vec![val; usize::from(len)];
                let res = if via_guest {
                    self.mem
                        .write(self.gpa_of(page).add(u64::from(off)), &bytes)
                        .map_err(|e| match e {
                            GuestMemoryError::Host { source, .. } => source,
                            e => panic!("unexpected guest error {e}"),
                        })
                } else {
                    self.host.write(hva_of(page).add(u64::from(off)), &bytes)
                };
                if self.read_only.contains(&page) {
                    prop_assert!(matches!(res, Err(HostFault::WriteProtected { .. })), "{res:?}");
                } else {
                    prop_assert!(res.is_ok(), "{res:?}");
                    let mut d = self.model_page(page);
                    d[usize::from(off)..usize::from(off + len)].fill(val);
                    self.data.insert(page, d);
                    if via_guest && self.logging && page < THP_PAGES {
                        self.dirty.insert(u64::from(page));
                    }
                }
            }
            Op::CopyPage { src, dst } => {
                let d = self.model_page(src);
                if !self.read_only.contains(&dst) {
                    self.host.write(hva_of(dst), &d).unwrap();
                    self.data.insert(dst, d);
                }
            }
            Op::Collapse { block } => {
                let _ = self.host.collapse_thp(hva_of(u16::from(block) * 512));
            }
            Op::Split { block } => {
                let _ = self.host.split_thp(hva_of(u16::from(block) * 512));
            }
            Op::Migrate { page } => {
                if let Ok(new) = self.host.migrate(hva_of(page)) {
                    prop_assert_eq!(self.host.lookup(hva_of(page)).map(|l| l.pfn), Some(new));
                }
            }
            Op::SwapOut { page } => {
                if self.host.swap_out(hva_of(page)).is_ok() {
                    prop_assert_eq!(self.host.lookup(hva_of(page)), None);
                }
            }
            Op::SwapIn { page } => {
                self.host.swap_in(hva_of(page)).unwrap();
            }
            Op::Ksm { a, b } => {
                if let Ok(true) = self.host.ksm_merge(hva_of(a), hva_of(b)) {
                    prop_assert_eq!(self.model_page(a), self.model_page(b));
                    let (la, lb) = (
                        self.host.lookup(hva_of(a)).unwrap(),
                        self.host.lookup(hva_of(b)).unwrap(),
                    );
                    prop_assert_eq!(la.pfn, lb.pfn);
                    prop_assert!(la.shared && !la.writable);
                }
            }
            Op::Mprotect { page, npages, writable } => {
                let end = if page < THP_PAGES { THP_PAGES } else { PAGES };
                let n = npages.min(end - page);
                self.host
                    .mprotect(hva_of(page), u64::from(n) * PAGE_SIZE, writable)
                    .unwrap();
                for p in page..page + n {
                    if writable {
                        self.read_only.remove(&p);
                    } else {
                        self.read_only.insert(p);
                    }
                }
            }
            Op::Discard { page } => {
                self.host.munmap(hva_of(page), PAGE_SIZE).unwrap();
                prop_assert_eq!(self.host.lookup(hva_of(page)), None);
                self.host.mmap(hva_of(page), PAGE_SIZE, flags_of(page)).unwrap();
                self.data.remove(&page);
                self.read_only.remove(&page);
            }
            Op::MoveSlot { to } => {
                let gpa = SLOT0_GPAS[usize::from(to)];
                if gpa != self.slot0_gpa {
                    self.slots.move_slot(0, 0, Gpa::new(gpa)).unwrap();
                    self.slot0_gpa = gpa;
                }
            }
            Op::ToggleDirtyLog => {
                self.logging = !self.logging;
                let flags = if self.logging {
                    MemslotFlags::LOG_DIRTY_PAGES
                } else {
                    MemslotFlags::empty()
                };
                self.slots.update_flags(0, 0, flags).unwrap();
                self.dirty.clear();
            }
        }
        Ok(())
    }

    fn touched(op: &Op) -> Vec<u16> {
        match *op {
            Op::Write { page, .. }
            | Op::Migrate { page }
            | Op::SwapOut { page }
            | Op::SwapIn { page }
            | Op::Discard { page } => vec![page],
            Op::CopyPage { src: a, dst: b } | Op::Ksm { a, b } => vec![a, b],
            Op::Collapse { block } | Op::Split { block } => {
                (0..512).map(|i| u16::from(block) * 512 + i).step_by(37).collect()
            }
            Op::Mprotect { page, .. } => vec![page],
            Op::MoveSlot { .. } | Op::ToggleDirtyLog => vec![0, 1024],
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn host_and_memslot_operations_never_lose_data(ops in prop::collection::vec(op(), 1..40)) {
        let mut w = World::new();
        for op in &ops {
            let before = w.mapped_pfns();
            w.apply(op)?;
            let after = w.mapped_pfns();
            let arena = w.host.arena();
            for &pfn in before.difference(&after) {
                prop_assert!(arena.is_freed(pfn), "{op:?}: {pfn:?} unmapped but not freed");
                prop_assert!(arena.is_poisoned(pfn), "{op:?}: freed {pfn:?} not poisoned");
            }
            for &pfn in &after {
                prop_assert!(arena.check_live(pfn).is_ok(), "{op:?}: mapped {pfn:?} is free");
            }
            for page in World::touched(op) {
                prop_assert_eq!(w.read_page(page), w.model_page(page), "{:?}: page {}", op, page);
                // The same bytes through the guest view.
                let mut g = vec![0u8; 64];
                w.mem.read(w.gpa_of(page), &mut g).unwrap();
                prop_assert_eq!(&g[..], &w.model_page(page)[..64]);
            }
            if w.logging {
                let log = w.slots.get_dirty_log(0, 0).unwrap();
                let got: BTreeSet<u64> = log
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &word)| (0..64).filter(move |b| word & (1 << b) != 0).map(move |b| i as u64 * 64 + b))
                    .collect();
                prop_assert_eq!(&got, &w.dirty, "{:?}", op);
                w.dirty.clear();
            }
        }
        for (&page, d) in &w.data {
            prop_assert_eq!(&w.read_page(page), d, "final check of page {}", page);
        }
        for page in (0..PAGES).step_by(61).filter(|p| !w.data.contains_key(p)) {
            prop_assert!(w.read_page(page).iter().all(|&b| b == 0), "page {page} never written");
        }
    }
}
