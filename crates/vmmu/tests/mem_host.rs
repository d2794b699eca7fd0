//! The host address space: every operation, its notifier events, the
//! poisoning of freed frames, and typed errors that change nothing.

use std::sync::Arc;

use parking_lot::Mutex;
use vmmu::addr::{Hva, Level, PAGE_SIZE, Pfn};
use vmmu::host::mm::reclaim_retired_tables;
use vmmu::host::{
    FrameArena, HostAddressSpace, HostError, HostFault, HvaRange, MmuNotifier, NotifierEvent, NotifierRange, VmaFlags,
};

const MB2: u64 = 2 << 20;
const BASE: u64 = 0x4000_0000;

fn host() -> Arc<HostAddressSpace> {
    let arena = Arc::new(FrameArena::with_reserve(4 << 30).expect("4 GiB reservation"));
    Arc::new(HostAddressSpace::new(arena).expect("a root table"))
}

/// One notifier call: start (true) or end, the range, and the host's view
/// of the range's first page at that moment.
type Event = (bool, NotifierRange, Option<(Pfn, Level)>);

/// What a notifier saw: for each event, the host's view of the first page
/// of the range at start and at end.
#[derive(Default)]
struct Recorder {
    host: Mutex<Option<std::sync::Weak<HostAddressSpace>>>,
    log: Mutex<Vec<Event>>,
    young_calls: Mutex<u32>,
    released: Mutex<bool>,
}

impl Recorder {
    fn view(&self, r: &NotifierRange) -> Option<(Pfn, Level)> {
        let h = self.host.lock().as_ref()?.upgrade()?;
        h.lookup(r.range.start).map(|l| (l.pfn, l.level))
    }
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.log.lock())
    }
}

impl MmuNotifier for Recorder {
    fn invalidate_range_start(&self, r: &NotifierRange) {
        let v = self.view(r);
        self.log.lock().push((true, *r, v));
    }
    fn invalidate_range_end(&self, r: &NotifierRange) {
        let v = self.view(r);
        self.log.lock().push((false, *r, v));
    }
    fn clear_flush_young(&self, _: HvaRange) -> bool {
        *self.young_calls.lock() += 1;
        true
    }
    fn release(&self) {
        *self.released.lock() = true;
    }
}

fn with_recorder() -> (Arc<HostAddressSpace>, Arc<Recorder>) {
    let h = host();
    let rec = Arc::new(Recorder::default());
    *rec.host.lock() = Some(Arc::downgrade(&h));
    h.register_notifier(rec.clone());
    (h, rec)
}

fn page(h: &HostAddressSpace, hva: u64) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE as usize];
    h.read(Hva::new(hva), &mut b).unwrap();
    b
}

#[test]
fn demand_faults_pick_the_page_size() {
    let h = host();
    h.mmap(Hva::new(BASE), 4 * MB2, VmaFlags::WRITE).unwrap();
    h.mmap(Hva::new(BASE + 4 * MB2), 4 * MB2, VmaFlags::WRITE | VmaFlags::THP)
        .unwrap();
    h.mmap(Hva::new(1 << 40), 1 << 30, VmaFlags::WRITE | VmaFlags::HUGETLB_1G)
        .unwrap();
    assert_eq!(h.lookup(Hva::new(BASE)), None, "nothing before the first touch");
    let mut b = [0u8; 4];
    h.read(Hva::new(BASE + 5), &mut b).unwrap();
    assert_eq!(b, [0; 4], "first touch gives a zeroed frame");
    assert_eq!(h.host_pfn_mapping_level(Hva::new(BASE)), Some(Level::L1));
    h.write(Hva::new(BASE + 4 * MB2 + 0x1234), b"thp").unwrap();
    let l = h.lookup(Hva::new(BASE + 4 * MB2 + 0x1234)).unwrap();
    assert_eq!(l.level, Level::L2);
    assert!(l.base_pfn.raw().is_multiple_of(512));
    assert_eq!(l.pfn, l.base_pfn.add(1));
    assert!(l.writable && l.young && l.dirty);
    h.write(Hva::new((1 << 40) + 0x3000_0008), &[7]).unwrap();
    let l = h.lookup(Hva::new((1 << 40) + 0x3000_0008)).unwrap();
    assert_eq!(l.level, Level::L3);
    assert_eq!(l.pfn, l.base_pfn.add(0x3000_0000 >> 12));
    assert_eq!(h.stats().thp_faults, 1);
    // A write crossing a page boundary lands in two frames.
    h.write(Hva::new(BASE + PAGE_SIZE - 2), &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    h.read(Hva::new(BASE + PAGE_SIZE - 2), &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    assert_ne!(
        h.lookup(Hva::new(BASE)).unwrap().pfn,
        h.lookup(Hva::new(BASE + PAGE_SIZE)).unwrap().pfn
    );
}

#[test]
fn collapse_split_migrate_keep_data_and_notify_around_the_change() {
    let (h, rec) = with_recorder();
    let base = BASE;
    h.mmap(Hva::new(base), 2 * MB2, VmaFlags::WRITE | VmaFlags::THP)
        .unwrap();
    // Make the first 2M block small pages: fault one page in a THP region
    // then split, or simpler: fault, split, then fill.
    h.write(Hva::new(base), b"x").unwrap();
    h.split_thp(Hva::new(base)).unwrap();
    let ev = rec.take();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].1.event, NotifierEvent::Split);
    assert_eq!(ev[0].2.unwrap().1, Level::L2, "start: still huge");
    assert_eq!(ev[1].2.unwrap().1, Level::L1, "end: split");
    assert_eq!(ev[0].2.unwrap().0, ev[1].2.unwrap().0, "split keeps the frame");
    for i in 0..512u64 {
        h.write(Hva::new(base + i * PAGE_SIZE + 8), &i.to_le_bytes()).unwrap();
    }
    let small: Vec<Pfn> = (0..512)
        .map(|i| h.lookup(Hva::new(base + i * PAGE_SIZE)).unwrap().pfn)
        .collect();
    // Migrate one small page: new frame, old frame poisoned.
    let old = small[3];
    let new = h.migrate(Hva::new(base + 3 * PAGE_SIZE + 100)).unwrap();
    assert_ne!(new, old);
    assert!(h.arena().is_freed(old) && h.arena().is_poisoned(old));
    let ev = rec.take();
    assert_eq!(ev[0].1.event, NotifierEvent::Migrate);
    assert_eq!(ev[0].2.unwrap().0, old, "start sees the old frame");
    assert_eq!(ev[1].2.unwrap().0, new, "end sees the new frame");
    // Swap one out, it comes back with a new frame on collapse.
    h.swap_out(Hva::new(base + 7 * PAGE_SIZE)).unwrap();
    assert!(h.arena().is_poisoned(small[7]));
    assert_eq!(h.lookup(Hva::new(base + 7 * PAGE_SIZE)), None);
    rec.take();
    h.collapse_thp(Hva::new(base + 0x1000)).unwrap();
    let ev = rec.take();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].1.event, NotifierEvent::Collapse);
    assert_eq!(ev[0].1.range, HvaRange::new(Hva::new(base), MB2));
    assert_eq!(ev[1].2.unwrap().1, Level::L2);
    for i in 0..512u64 {
        let mut b = [0u8; 8];
        h.read(Hva::new(base + i * PAGE_SIZE + 8), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), i, "page {i} survived the collapse");
    }
    for (i, &p) in small.iter().enumerate() {
        if i != 3 {
            assert!(h.arena().is_freed(p), "old frame {i} freed");
        }
    }
    assert_eq!(h.swapped_pages(), 0);
    // Migrate the huge page.
    let before = h.lookup(Hva::new(base)).unwrap();
    let after = h.migrate(Hva::new(base + 0x5000)).unwrap();
    let l = h.lookup(Hva::new(base)).unwrap();
    assert_eq!(l.level, Level::L2);
    assert_eq!(after, l.base_pfn.add(5));
    assert!(h.arena().is_poisoned(before.base_pfn.add(511)));
    assert_eq!(&page(&h, base + 9 * PAGE_SIZE)[8..16], &9u64.to_le_bytes());
    let s = h.stats();
    assert_eq!((s.collapses, s.splits, s.migrations, s.swap_outs), (1, 1, 2, 1));
}

#[test]
fn swap_ksm_and_mprotect() {
    let (h, rec) = with_recorder();
    h.mmap(Hva::new(BASE), 16 * PAGE_SIZE, VmaFlags::WRITE).unwrap();
    let (a, b, c) = (BASE, BASE + PAGE_SIZE, BASE + 2 * PAGE_SIZE);
    h.write(Hva::new(a), b"same").unwrap();
    h.write(Hva::new(b), b"same").unwrap();
    h.write(Hva::new(c), b"diff").unwrap();
    let pb = h.lookup(Hva::new(b)).unwrap().pfn;
    assert!(!h.ksm_merge(Hva::new(a), Hva::new(c)).unwrap());
    assert!(h.ksm_merge(Hva::new(a), Hva::new(b)).unwrap());
    let (la, lb) = (h.lookup(Hva::new(a)).unwrap(), h.lookup(Hva::new(b)).unwrap());
    assert_eq!(la.pfn, lb.pfn);
    assert!(la.shared && !la.writable && !lb.writable);
    assert!(h.arena().is_poisoned(pb));
    let ev = rec.take();
    assert!(ev.iter().all(|e| e.1.event == NotifierEvent::KsmMerge));
    assert_eq!(ev.len(), 4);
    // Write breaks the sharing with copy on write.
    h.write(Hva::new(b + 2), b"X").unwrap();
    assert_eq!(&page(&h, b)[..4], b"saXe");
    assert_eq!(&page(&h, a)[..4], b"same");
    let lb = h.lookup(Hva::new(b)).unwrap();
    assert!(lb.writable && !lb.shared && lb.pfn != la.pfn);
    assert_eq!(rec.take()[0].1.event, NotifierEvent::CowBreak);
    assert_eq!(h.stats().cow_breaks, 1);
    // The last sharer's write frees the KSM frame.
    h.write(Hva::new(a), b"S").unwrap();
    assert!(h.arena().is_freed(la.pfn));
    // Swap out and in: data kept, new frame.
    let old = h.lookup(Hva::new(c)).unwrap().pfn;
    h.swap_out(Hva::new(c)).unwrap();
    assert_eq!(h.swapped_pages(), 1);
    assert!(h.arena().is_freed(old));
    let leaf = h.swap_in(Hva::new(c)).unwrap();
    assert_eq!(&page(&h, c)[..4], b"diff");
    assert_eq!(h.swapped_pages(), 0);
    assert_eq!(h.stats().swap_ins, 1);
    assert!(h.arena().check_live(leaf.pfn).is_ok());
    // mprotect read-only: writes fault, reads work; back to RW.
    rec.take();
    h.mprotect(Hva::new(BASE), 4 * PAGE_SIZE, false).unwrap();
    assert_eq!(rec.take()[0].1.event, NotifierEvent::Protection);
    assert!(!h.lookup(Hva::new(c)).unwrap().writable);
    assert!(matches!(
        h.write(Hva::new(c), b"no"),
        Err(HostFault::WriteProtected { .. })
    ));
    assert_eq!(&page(&h, c)[..4], b"diff");
    h.write(Hva::new(BASE + 4 * PAGE_SIZE), b"ok").unwrap();
    h.mprotect(Hva::new(BASE), 4 * PAGE_SIZE, true).unwrap();
    h.write(Hva::new(c), b"yes").unwrap();
    assert_eq!(&page(&h, c)[..4], b"yesf");
}

#[test]
fn munmap_aging_release_and_drop_free_everything() {
    let (h, rec) = with_recorder();
    let arena = h.arena().clone();
    let baseline = arena.allocated_frames();
    h.mmap(Hva::new(BASE), 8 * MB2, VmaFlags::WRITE | VmaFlags::THP)
        .unwrap();
    for i in 0..8 {
        h.write(Hva::new(BASE + i * MB2 + 0x10), b"data").unwrap();
    }
    h.split_thp(Hva::new(BASE + MB2)).unwrap();
    // Aging: young after access, cleared, notifier asked.
    let r = HvaRange::new(Hva::new(BASE), 8 * MB2);
    assert!(h.test_young(r));
    assert!(h.clear_flush_young(r));
    assert_eq!(*rec.young_calls.lock(), 1);
    assert!(!h.lookup(Hva::new(BASE)).unwrap().young);
    let mut b = [0u8; 1];
    h.read(Hva::new(BASE), &mut b).unwrap();
    assert!(h.lookup(Hva::new(BASE)).unwrap().young);
    rec.take();
    // Unmap a range that splits a THP at its start edge.
    let pfn = h.lookup(Hva::new(BASE + 2 * MB2)).unwrap().base_pfn;
    h.munmap(Hva::new(BASE + MB2 + 0x4000), 2 * MB2).unwrap();
    let ev = rec.take();
    assert_eq!(ev.last().unwrap().1.event, NotifierEvent::Unmap);
    assert!(arena.is_freed(pfn) && arena.is_poisoned(pfn));
    assert!(h.lookup(Hva::new(BASE + 2 * MB2)).is_none());
    assert!(matches!(
        h.read(Hva::new(BASE + 2 * MB2), &mut b),
        Err(HostFault::NotMapped { .. })
    ));
    assert!(h.lookup(Hva::new(BASE + MB2)).is_some(), "below the hole stays");
    assert_eq!(
        &page(&h, BASE + 3 * MB2 + 0x4000)[..4],
        [0; 4],
        "the page just past the hole is still mapped"
    );
    drop(h);
    assert!(*rec.released.lock(), "release() reached the notifier");
    reclaim_retired_tables();
    for _ in 0..100 {
        if arena.allocated_frames() == baseline - 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        reclaim_retired_tables();
    }
    assert_eq!(arena.allocated_frames(), 0, "every data frame and table freed");
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let (h, rec) = with_recorder();
    h.mmap(Hva::new(BASE), 4 * MB2, VmaFlags::WRITE).unwrap();
    h.write(Hva::new(BASE), b"keep").unwrap();
    let before = h.lookup(Hva::new(BASE)).unwrap();
    let frames = h.arena().allocated_frames();
    let e = h.mmap(Hva::new(BASE + MB2), MB2, VmaFlags::WRITE).unwrap_err();
    assert!(
        matches!(e, HostError::Overlap { existing, .. } if existing == Hva::new(BASE)),
        "{e}"
    );
    assert!(matches!(
        h.mmap(Hva::new(BASE + 1), MB2, VmaFlags::WRITE),
        Err(HostError::Unaligned { what: "address", .. })
    ));
    assert!(matches!(
        h.mmap(Hva::new(0x9000_0000), 0, VmaFlags::WRITE),
        Err(HostError::EmptyRange { .. })
    ));
    assert!(matches!(
        h.mmap(Hva::new(1 << 47), PAGE_SIZE, VmaFlags::WRITE),
        Err(HostError::OutOfAddressSpace { .. })
    ));
    assert!(matches!(
        h.mmap(Hva::new(0x1000), 0x1000, VmaFlags::HUGETLB_1G),
        Err(HostError::Unaligned { .. })
    ));
    assert!(matches!(
        h.collapse_thp(Hva::new(BASE)),
        Err(HostError::NotApplicable { op: "collapse", .. })
    ));
    assert!(matches!(
        h.split_thp(Hva::new(BASE)),
        Err(HostError::NotApplicable { op: "split", .. })
    ));
    assert!(matches!(
        h.migrate(Hva::new(BASE + MB2)),
        Err(HostError::NotApplicable { op: "migrate", .. })
    ));
    assert!(matches!(
        h.mprotect(Hva::new(BASE), 8 * MB2, false),
        Err(HostError::NotMapped { hva }) if hva == Hva::new(BASE + 4 * MB2)
    ));
    assert!(matches!(
        h.ksm_merge(Hva::new(BASE), Hva::new(BASE)),
        Err(HostError::NotApplicable { .. })
    ));
    assert!(matches!(
        h.fault_in(Hva::new(0x10_0000), false),
        Err(HostFault::NotMapped { .. })
    ));
    assert_eq!(h.lookup(Hva::new(BASE)), Some(before));
    assert!(h.lookup(Hva::new(BASE)).unwrap().writable, "failed mprotect kept RW");
    assert_eq!(h.arena().allocated_frames(), frames);
    assert!(rec.take().is_empty(), "no notifier event for a refused operation");
    assert_eq!(&page(&h, BASE)[..4], b"keep");
}

#[test]
fn unregistered_notifier_hears_nothing() {
    let h = host();
    let rec = Arc::new(Recorder::default());
    let id = h.register_notifier(rec.clone());
    h.mmap(Hva::new(BASE), PAGE_SIZE, VmaFlags::WRITE).unwrap();
    h.write(Hva::new(BASE), b"a").unwrap();
    h.migrate(Hva::new(BASE)).unwrap();
    assert_eq!(rec.take().len(), 2);
    assert!(h.unregister_notifier(id));
    assert!(!h.unregister_notifier(id));
    h.migrate(Hva::new(BASE)).unwrap();
    assert!(rec.take().is_empty());
}
