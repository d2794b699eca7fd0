//! Host physical memory: the frame arena.
//!
//! One large anonymous mapping stands for the host's physical memory; frame
//! `n` of the mapping is host frame `first_pfn + n`. The mapping is reserved
//! with `MAP_NORESERVE` and backed lazily by the OS, so a 64 GiB arena costs
//! only what is touched.
//!
//! Everything that reaches memory through a frame number lives here, and this
//! is the only module of the memory layer with `unsafe` code. Every access to
//! frame contents is an atomic access to a 64-bit word, so that concurrent
//! readers and writers (vCPUs, the VMM, the host's migration) never race in
//! the language's sense. A page table is a frame seen as
//! `&[AtomicU64; 512]` ([`FrameArena::table`]); data is read and written
//! through the byte helpers, which split an access into its words.
//!
//! Each frame has a state word: allocated or free, and an allocation
//! generation. A freed frame is filled with a poison pattern
//! ([`poison_word`]), so that a use through a stale mapping is caught either
//! by [`FrameArena::check_live`] or by the data it reads. Reading a freed
//! frame is memory-safe (the arena stays mapped), only logically wrong.
//!
//! The allocator keeps free lists for 4 KiB, 2 MiB and 1 GiB runs and a bump
//! pointer; a 2 MiB run is carved into 4 KiB frames when the 4 KiB list is
//! empty, and freed frames are not coalesced back into larger runs (the
//! reservation is large, fragmentation only costs address space).

use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapMut, MmapOptions};
use parking_lot::Mutex;

use crate::addr::{PAGE_SIZE, PageSize, Pfn};
use crate::host::FrameError;

/// Number of 64-bit words in a 4 KiB frame.
pub const FRAME_WORDS: usize = 512;

/// A frame seen as 512 atomic 64-bit entries (a page table).
pub type FrameTable = [AtomicU64; FRAME_WORDS];

/// The high half of every poison word.
pub const POISON_TAG: u64 = 0xDEAD_F4EE_0000_0000;

/// The word a freed frame is filled with: [`POISON_TAG`] and the low 32 bits
/// of the frame number, so a stale read also tells which frame it hit.
#[inline]
pub const fn poison_word(pfn: Pfn) -> u64 {
    POISON_TAG | (pfn.raw() & 0xFFFF_FFFF)
}

/// Default address space reserved for host frames: 64 GiB.
pub const DEFAULT_RESERVE_BYTES: u64 = 64 << 30;

/// Frames per 1 GiB; the first frame number must be a multiple of it so
/// that natural alignment of frame numbers and of arena offsets agree.
const FRAMES_PER_1G: u64 = PageSize::Size1G.frames();

/// State bit of a frame: allocated.
const STATE_ALLOCATED: u64 = 1;

/// Whether a frame is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameState {
    /// Never allocated, or freed (and then poisoned).
    Free,
    /// Allocated and not yet freed.
    Allocated,
}

/// How to build a [`FrameArena`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameArenaConfig {
    /// Bytes of address space to reserve; rounded up to 1 GiB.
    pub reserve_bytes: u64,
    /// The frame number of the arena's first frame; a multiple of 262144
    /// (1 GiB) so 2 MiB and 1 GiB runs are naturally aligned frame numbers.
    /// Non-zero by default so a zeroed entry never points at a valid frame.
    pub first_pfn: Pfn,
}

impl Default for FrameArenaConfig {
    fn default() -> Self {
        Self {
            reserve_bytes: DEFAULT_RESERVE_BYTES,
            first_pfn: Pfn::new(FRAMES_PER_1G),
        }
    }
}

/// A run on a free list: arena frame index, and whether it is known to be
/// all zeroes (never touched since the OS gave it to us).
#[derive(Clone, Copy, Debug)]
struct FreeRun {
    index: u64,
    clean: bool,
}

/// The allocator proper, behind the arena's mutex.
#[derive(Debug, Default)]
struct Allocator {
    /// Next never-used frame index.
    bump: u64,
    /// Free runs of 1, 512 and 262144 frames.
    free: [Vec<FreeRun>; 3],
}

fn order_of(size: PageSize) -> Result<usize, FrameError> {
    match size {
        PageSize::Size4K => Ok(0),
        PageSize::Size2M => Ok(1),
        PageSize::Size1G => Ok(2),
        PageSize::Size4M => Err(FrameError::UnsupportedSize { size }),
    }
}

const ORDER_FRAMES: [u64; 3] = [1, 512, 512 * 512];

impl Allocator {
    /// Takes a run of `order` from the free lists or the bump pointer.
    fn take(&mut self, order: usize, nr_frames: u64) -> Option<FreeRun> {
        if let Some(run) = self.free[order].pop() {
            return Some(run);
        }
        // Carve a larger free run.
        if order < 2
            && let Some(big) = self.take_free_larger(order + 1)
        {
            let n = ORDER_FRAMES[order];
            let pieces = ORDER_FRAMES[order + 1] / n;
            for i in (1..pieces).rev() {
                self.free[order].push(FreeRun {
                    index: big.index + i * n,
                    clean: big.clean,
                });
            }
            return Some(big);
        }
        // Bump, aligning to the run size; the skipped gap goes to the free
        // lists as the largest runs that fit.
        let n = ORDER_FRAMES[order];
        let start = self.bump.next_multiple_of(n);
        if start.checked_add(n)? > nr_frames {
            return None;
        }
        let mut gap = self.bump;
        while gap < start {
            let o = if gap.is_multiple_of(ORDER_FRAMES[1]) && gap + ORDER_FRAMES[1] <= start {
                1
            } else {
                0
            };
            self.free[o].push(FreeRun {
                index: gap,
                clean: true,
            });
            gap += ORDER_FRAMES[o];
        }
        self.bump = start + n;
        Some(FreeRun {
            index: start,
            clean: true,
        })
    }

    /// A free run of `order` or larger, split down to `order`.
    fn take_free_larger(&mut self, order: usize) -> Option<FreeRun> {
        if let Some(run) = self.free[order].pop() {
            return Some(run);
        }
        if order < 2 {
            let big = self.take_free_larger(order + 1)?;
            let n = ORDER_FRAMES[order];
            for i in (1..ORDER_FRAMES[order + 1] / n).rev() {
                self.free[order].push(FreeRun {
                    index: big.index + i * n,
                    clean: big.clean,
                });
            }
            return Some(big);
        }
        None
    }
}

/// The host's physical memory: frames addressed by [`Pfn`].
///
/// Shared by the host address space (data frames and its own page tables)
/// and by the MMUs (SPTE tables). All methods take `&self` and are
/// thread-safe.
pub struct FrameArena {
    /// The frames. Only reached through `frames.as_ptr()`.
    frames: MmapMut,
    /// One state word per frame: bit 0 allocated, bits 63..1 generation.
    states: MmapMut,
    nr_frames: u64,
    first_pfn: u64,
    alloc: Mutex<Allocator>,
    allocated: AtomicU64,
    /// Allocations made so far (runs of any size).
    allocations: AtomicU64,
    /// Fault injection (Linux's `fail-nth`): when not 0, the allocation
    /// that brings it to 0 fails.
    fail_nth: AtomicU64,
}

impl std::fmt::Debug for FrameArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameArena")
            .field("first_pfn", &Pfn::new(self.first_pfn))
            .field("nr_frames", &self.nr_frames)
            .field("allocated", &self.allocated_frames())
            .finish()
    }
}

impl FrameArena {
    /// Reserves the arena's address space (no memory is committed).
    pub fn new(config: FrameArenaConfig) -> Result<Self, FrameError> {
        let first_pfn = config.first_pfn.raw();
        if !first_pfn.is_multiple_of(FRAMES_PER_1G) {
            return Err(FrameError::MisalignedFirstPfn { pfn: config.first_pfn });
        }
        let bytes = config.reserve_bytes.max(1).next_multiple_of(1 << 30);
        let nr_frames = bytes / PAGE_SIZE;
        let len = usize::try_from(bytes).map_err(|_| FrameError::Reserve {
            bytes,
            source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
        })?;
        let map = |len: usize| {
            MmapOptions::new()
                .len(len)
                .no_reserve_swap()
                .map_anon()
                .map_err(|source| FrameError::Reserve {
                    bytes: len as u64,
                    source,
                })
        };
        let frames = map(len)?;
        let states = map(nr_frames as usize * 8)?;
        Ok(Self {
            frames,
            states,
            nr_frames,
            first_pfn,
            alloc: Mutex::new(Allocator::default()),
            allocated: AtomicU64::new(0),
            allocations: AtomicU64::new(0),
            fail_nth: AtomicU64::new(0),
        })
    }

    /// An arena reserving `bytes` of address space, with default settings otherwise.
    pub fn with_reserve(bytes: u64) -> Result<Self, FrameError> {
        Self::new(FrameArenaConfig {
            reserve_bytes: bytes,
            ..FrameArenaConfig::default()
        })
    }

    /// The first frame number of the arena.
    pub fn first_pfn(&self) -> Pfn {
        Pfn::new(self.first_pfn)
    }

    /// Number of frames the arena can hold.
    pub fn capacity_frames(&self) -> u64 {
        self.nr_frames
    }

    /// Whether `pfn` is one of the arena's frames.
    #[inline]
    pub fn contains(&self, pfn: Pfn) -> bool {
        pfn.raw().wrapping_sub(self.first_pfn) < self.nr_frames
    }

    /// Frames currently allocated (the resident usage the host accounts).
    pub fn allocated_frames(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Bytes currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_frames() * PAGE_SIZE
    }

    #[inline]
    fn index(&self, pfn: Pfn) -> Result<u64, FrameError> {
        let i = pfn.raw().wrapping_sub(self.first_pfn);
        if i < self.nr_frames {
            Ok(i)
        } else {
            Err(FrameError::OutOfRange { pfn })
        }
    }

    #[inline]
    fn state_word(&self, index: u64) -> &AtomicU64 {
        debug_assert!(index < self.nr_frames);
        // SAFETY: `states` is a live, 8-byte aligned (page-aligned mapping)
        // anonymous mapping of `nr_frames * 8` bytes owned by `self`, and
        // `index < nr_frames`, so the pointer is in bounds and aligned. The
        // memory is only ever accessed through atomics, so shared references
        // to `AtomicU64` over it never alias a non-atomic access. The
        // reference cannot outlive `self`, which owns the mapping.
        unsafe { &*self.states.as_ptr().cast::<AtomicU64>().add(index as usize) }
    }

    #[inline]
    fn table_at(&self, index: u64) -> &FrameTable {
        debug_assert!(index < self.nr_frames);
        // SAFETY: `frames` is a live, page-aligned anonymous mapping of
        // `nr_frames * 4096` bytes owned by `self`; `index < nr_frames` so
        // the 4096 bytes at `index * 4096` are in bounds and 8-byte aligned.
        // Frame contents are only ever accessed through `AtomicU64`, so the
        // shared reference aliases no non-atomic access, and the mapping is
        // never unmapped or moved while `self` lives (freed frames stay
        // mapped, only poisoned), so any in-range frame is valid memory for
        // the reference's lifetime.
        unsafe {
            &*self
                .frames
                .as_ptr()
                .add(index as usize * PAGE_SIZE as usize)
                .cast::<FrameTable>()
        }
    }

    /// The frame `pfn` as 512 atomic entries: how page tables (the host's,
    /// and the MMUs' SPTE tables) are read and compare-exchanged.
    ///
    /// # Panics
    /// If `pfn` is not a frame of this arena (a caller bug: frame numbers
    /// come from [`FrameArena::alloc`]).
    #[inline]
    pub fn table(&self, pfn: Pfn) -> &FrameTable {
        match self.index(pfn) {
            Ok(i) => self.table_at(i),
            Err(_) => panic!("{pfn:?} is not a frame of this arena"),
        }
    }

    /// Like [`FrameArena::table`], but `None` for a frame outside the arena.
    #[inline]
    pub fn try_table(&self, pfn: Pfn) -> Option<&FrameTable> {
        self.index(pfn).ok().map(|i| self.table_at(i))
    }

    /// Allocates a zeroed, naturally aligned run of `size` (4K, 2M or 1G).
    /// Every frame of the run becomes [`FrameState::Allocated`] with a new
    /// generation; each can later be freed on its own (4K) or as the run.
    pub fn alloc(&self, size: PageSize) -> Result<Pfn, FrameError> {
        let order = order_of(size)?;
        self.allocations.fetch_add(1, Ordering::Relaxed);
        let injected = self.fail_nth.load(Ordering::Relaxed) != 0
            && self
                .fail_nth
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok_and(|n| n == 1);
        if injected {
            return Err(FrameError::OutOfFrames {
                size,
                capacity_frames: self.nr_frames,
                allocated_frames: self.allocated_frames(),
            });
        }
        let run = self
            .alloc
            .lock()
            .take(order, self.nr_frames)
            .ok_or(FrameError::OutOfFrames {
                size,
                capacity_frames: self.nr_frames,
                allocated_frames: self.allocated_frames(),
            })?;
        let n = ORDER_FRAMES[order];
        for i in run.index..run.index + n {
            if !run.clean {
                for w in self.table_at(i) {
                    w.store(0, Ordering::Relaxed);
                }
            }
            // Free state is `gen << 1`; allocated is `(gen + 1) << 1 | 1`,
            // hence + 3. Release: the zeroing above is visible to whoever
            // observes the allocated state.
            self.state_word(i).fetch_add(2 + STATE_ALLOCATED, Ordering::Release);
        }
        self.allocated.fetch_add(n, Ordering::Relaxed);
        Ok(Pfn::new(self.first_pfn + run.index))
    }

    /// Allocates one zeroed 4 KiB frame.
    pub fn alloc_4k(&self) -> Result<Pfn, FrameError> {
        self.alloc(PageSize::Size4K)
    }

    /// Allocations made so far (each [`FrameArena::alloc`] call, failed
    /// ones included).
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Fault injection, as Linux's `fail-nth`: the `n`-th allocation from
    /// now fails with [`FrameError::OutOfFrames`] (once), whatever is free;
    /// 0 cancels. For testing that every caller survives running out of
    /// memory at every allocation point, and works again when memory
    /// returns.
    pub fn fail_nth(&self, n: u64) {
        self.fail_nth.store(n, Ordering::Release);
    }

    /// Zeroes an allocated frame (a page table taken for use and given
    /// back unpublished, before it is reused).
    pub fn zero(&self, pfn: Pfn) {
        for w in self.table(pfn) {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Frees a run previously allocated (or a 4K frame of one), poisoning
    /// every word. Checks everything before changing anything: a frame out
    /// of range, a misaligned run or a frame that is already free is an
    /// error and frees nothing.
    pub fn free(&self, pfn: Pfn, size: PageSize) -> Result<(), FrameError> {
        let order = order_of(size)?;
        let n = ORDER_FRAMES[order];
        let first = self.index(pfn)?;
        if !pfn.raw().is_multiple_of(n) {
            return Err(FrameError::Misaligned { pfn, size });
        }
        self.index(pfn.add(n - 1))?;
        for i in first..first + n {
            if self.state_word(i).load(Ordering::Acquire) & STATE_ALLOCATED == 0 {
                return Err(FrameError::DoubleFree {
                    pfn: Pfn::new(self.first_pfn + i),
                });
            }
        }
        for i in first..first + n {
            let poison = poison_word(Pfn::new(self.first_pfn + i));
            for w in self.table_at(i) {
                w.store(poison, Ordering::Relaxed);
            }
            // Bit 0 goes from 1 to 0, the generation is kept.
            self.state_word(i).fetch_sub(STATE_ALLOCATED, Ordering::Release);
        }
        self.allocated.fetch_sub(n, Ordering::Relaxed);
        self.alloc.lock().free[order].push(FreeRun {
            index: first,
            clean: false,
        });
        Ok(())
    }

    /// The state of `pfn`, `None` outside the arena.
    pub fn state(&self, pfn: Pfn) -> Option<FrameState> {
        let i = self.index(pfn).ok()?;
        Some(if self.state_word(i).load(Ordering::Acquire) & STATE_ALLOCATED != 0 {
            FrameState::Allocated
        } else {
            FrameState::Free
        })
    }

    /// How many times `pfn` has been allocated (0: never), `None` outside the arena.
    pub fn generation(&self, pfn: Pfn) -> Option<u64> {
        let i = self.index(pfn).ok()?;
        Some(self.state_word(i).load(Ordering::Acquire) >> 1)
    }

    /// Whether `pfn` was allocated once and is free now: any use of it is a
    /// use after free.
    pub fn is_freed(&self, pfn: Pfn) -> bool {
        self.index(pfn).is_ok_and(|i| {
            let s = self.state_word(i).load(Ordering::Acquire);
            s & STATE_ALLOCATED == 0 && s >> 1 != 0
        })
    }

    /// `Ok` if `pfn` is allocated now; the error tells what is wrong.
    pub fn check_live(&self, pfn: Pfn) -> Result<(), FrameError> {
        let i = self.index(pfn)?;
        let s = self.state_word(i).load(Ordering::Acquire);
        if s & STATE_ALLOCATED != 0 {
            Ok(())
        } else {
            Err(FrameError::NotAllocated {
                pfn,
                generation: s >> 1,
            })
        }
    }

    /// Whether every word of `pfn` holds its poison pattern.
    pub fn is_poisoned(&self, pfn: Pfn) -> bool {
        let Some(t) = self.try_table(pfn) else {
            return false;
        };
        let p = poison_word(pfn);
        t.iter().all(|w| w.load(Ordering::Relaxed) == p)
    }

    /// Reads `buf.len()` bytes at byte `offset` of frame `pfn`. Each word is
    /// read with one atomic load, so an aligned access of up to 8 bytes is
    /// single-copy atomic.
    ///
    /// # Panics
    /// If `pfn` is outside the arena or the range leaves the frame.
    pub fn read(&self, pfn: Pfn, offset: usize, buf: &mut [u8]) {
        assert!(
            offset + buf.len() <= PAGE_SIZE as usize,
            "read of {} bytes at offset {offset} leaves the frame",
            buf.len()
        );
        let t = self.table(pfn);
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done;
            let (word, shift) = (at / 8, at % 8);
            let n = (8 - shift).min(buf.len() - done);
            let bytes = t[word].load(Ordering::Acquire).to_le_bytes();
            buf[done..done + n].copy_from_slice(&bytes[shift..shift + n]);
            done += n;
        }
    }

    /// Writes `buf` at byte `offset` of frame `pfn`: whole words with one
    /// atomic store, partial words with a compare-exchange loop so the
    /// neighbouring bytes are never rolled back.
    ///
    /// # Panics
    /// If `pfn` is outside the arena or the range leaves the frame.
    pub fn write(&self, pfn: Pfn, offset: usize, buf: &[u8]) {
        assert!(
            offset + buf.len() <= PAGE_SIZE as usize,
            "write of {} bytes at offset {offset} leaves the frame",
            buf.len()
        );
        let t = self.table(pfn);
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done;
            let (word, shift) = (at / 8, at % 8);
            let n = (8 - shift).min(buf.len() - done);
            if n == 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[done..done + 8]);
                t[word].store(u64::from_le_bytes(b), Ordering::Release);
            } else {
                let mut val = [0u8; 8];
                val[shift..shift + n].copy_from_slice(&buf[done..done + n]);
                let val = u64::from_le_bytes(val);
                let mask = (u64::MAX >> (64 - 8 * n as u32)) << (8 * shift);
                // fetch_update retries until no other writer intervened.
                let _ = t[word].fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    Some((cur & !mask) | (val & mask))
                });
            }
            done += n;
        }
    }

    /// A processor's data access of `size` (1..=8) bytes at byte `offset`
    /// of frame `pfn`: a read returns the bytes, zero-extended; a write
    /// stores the low `size` bytes of `value` and returns 0. Also returns
    /// whether the frame is freed now ([`FrameArena::is_freed`]), the
    /// hardware model's check that no translation outlives its frame. An
    /// aligned quadword is one atomic load or store.
    ///
    /// # Panics
    /// If `pfn` is outside the arena or the range leaves the frame.
    #[inline]
    pub fn data_access(&self, pfn: Pfn, offset: usize, size: usize, write: bool, value: u64) -> (u64, bool) {
        let Ok(i) = self.index(pfn) else {
            panic!("{pfn:?} is not a frame of this arena")
        };
        let s = self.state_word(i).load(Ordering::Acquire);
        let freed = s & STATE_ALLOCATED == 0 && s >> 1 != 0;
        if size == 8 && offset.is_multiple_of(8) {
            let word = &self.table_at(i)[offset / 8];
            if write {
                word.store(value, Ordering::Release);
                return (0, freed);
            }
            return (word.load(Ordering::Acquire), freed);
        }
        if write {
            self.write(pfn, offset, &value.to_le_bytes()[..size]);
            return (0, freed);
        }
        let mut b = [0u8; 8];
        self.read(pfn, offset, &mut b[..size]);
        (u64::from_le_bytes(b), freed)
    }

    /// Reads a little-endian value of `size` bytes (1, 2, 4 or 8) at
    /// `offset`; atomic when the value does not cross an 8-byte boundary.
    pub fn read_value(&self, pfn: Pfn, offset: usize, size: usize) -> u64 {
        assert!(matches!(size, 1 | 2 | 4 | 8), "value size {size} is not 1, 2, 4 or 8");
        let mut b = [0u8; 8];
        self.read(pfn, offset, &mut b[..size]);
        u64::from_le_bytes(b)
    }

    /// Writes the low `size` bytes (1, 2, 4 or 8) of `val` at `offset`;
    /// atomic when the value does not cross an 8-byte boundary.
    pub fn write_value(&self, pfn: Pfn, offset: usize, size: usize, val: u64) {
        assert!(matches!(size, 1 | 2 | 4 | 8), "value size {size} is not 1, 2, 4 or 8");
        self.write(pfn, offset, &val.to_le_bytes()[..size]);
    }

    /// Atomically replaces the `size`-byte (4 or 8) value at `offset`, which
    /// must be aligned to `size`, with `new` if it holds `old`. On failure
    /// returns the current value.
    ///
    /// # Panics
    /// On a size other than 4 or 8 or a misaligned offset.
    pub fn cmpxchg_value(&self, pfn: Pfn, offset: usize, size: usize, old: u64, new: u64) -> Result<(), u64> {
        assert!(
            matches!(size, 4 | 8) && offset.is_multiple_of(size) && offset < PAGE_SIZE as usize,
            "cmpxchg of {size} bytes at offset {offset} is not a naturally aligned 4 or 8 byte access"
        );
        let word = &self.table(pfn)[offset / 8];
        if size == 8 {
            return word
                .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                .map(|_| ());
        }
        let shift = 8 * (offset % 8) as u32;
        let mask = 0xFFFF_FFFFu64 << shift;
        let (old, new) = (old & 0xFFFF_FFFF, new & 0xFFFF_FFFF);
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if (cur & mask) >> shift != old {
                return Err((cur & mask) >> shift);
            }
            let next = (cur & !mask) | (new << shift);
            match word.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Copies frame `src` to frame `dst`, word by word.
    pub fn copy_frame(&self, dst: Pfn, src: Pfn) {
        let (d, s) = (self.table(dst), self.table(src));
        for (d, s) in d.iter().zip(s) {
            d.store(s.load(Ordering::Acquire), Ordering::Release);
        }
    }

    /// Copies `frames` consecutive frames from `src` to `dst` (bulk copy for
    /// migration and THP collapse).
    pub fn copy_frames(&self, dst: Pfn, src: Pfn, frames: u64) {
        for i in 0..frames {
            self.copy_frame(dst.add(i), src.add(i));
        }
    }

    /// Copies a frame's 4096 bytes out.
    pub fn frame_bytes(&self, pfn: Pfn) -> Box<[u8; PAGE_SIZE as usize]> {
        let mut out = Box::new([0u8; PAGE_SIZE as usize]);
        self.read(pfn, 0, &mut out[..]);
        out
    }

    /// Whether two frames hold the same bytes.
    pub fn frames_equal(&self, a: Pfn, b: Pfn) -> bool {
        let (a, b) = (self.table(a), self.table(b));
        a.iter()
            .zip(b)
            .all(|(x, y)| x.load(Ordering::Acquire) == y.load(Ordering::Acquire))
    }

    /// Whether frame `pfn` is all zeroes.
    pub fn is_zero(&self, pfn: Pfn) -> bool {
        self.table(pfn).iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena() -> FrameArena {
        FrameArena::with_reserve(4 << 30).expect("a 4 GiB NORESERVE reservation succeeds")
    }

    #[test]
    fn reserves_64_gib_lazily() {
        let a = FrameArena::new(FrameArenaConfig::default()).expect("64 GiB NORESERVE mapping");
        assert_eq!(a.capacity_frames(), 16 << 20);
        let p = a.alloc(PageSize::Size1G).unwrap();
        assert!(p.raw().is_multiple_of(FRAMES_PER_1G));
        assert_eq!(a.allocated_frames(), FRAMES_PER_1G);
    }

    #[test]
    fn alloc_is_zeroed_aligned_and_free_poisons() {
        let a = arena();
        let p = a.alloc_4k().unwrap();
        assert!(a.is_zero(p));
        assert_eq!(a.state(p), Some(FrameState::Allocated));
        assert_eq!(a.generation(p), Some(1));
        a.write_value(p, 8, 8, 0x1122_3344_5566_7788);
        a.free(p, PageSize::Size4K).unwrap();
        assert!(a.is_freed(p));
        assert!(a.is_poisoned(p));
        assert_eq!(a.read_value(p, 0, 8), poison_word(p));
        assert!(matches!(
            a.check_live(p),
            Err(FrameError::NotAllocated { generation: 1, .. })
        ));
        assert!(matches!(
            a.free(p, PageSize::Size4K),
            Err(FrameError::DoubleFree { .. })
        ));
        // Reuse zeroes and bumps the generation.
        let q = a.alloc_4k().unwrap();
        assert_eq!(q, p);
        assert!(a.is_zero(q));
        assert_eq!(a.generation(q), Some(2));
        let h = a.alloc(PageSize::Size2M).unwrap();
        assert!(h.raw().is_multiple_of(512));
        assert_eq!(a.allocated_frames(), 513);
        // A 2M run can be freed frame by frame.
        for i in 0..512 {
            a.free(h.add(i), PageSize::Size4K).unwrap();
        }
        assert_eq!(a.allocated_frames(), 1);
        assert!(matches!(
            a.free(h.add(1), PageSize::Size2M),
            Err(FrameError::Misaligned { .. })
        ));
        assert!(matches!(
            a.free(Pfn::new(1), PageSize::Size4K),
            Err(FrameError::OutOfRange { .. })
        ));
    }

    #[test]
    fn byte_helpers_and_cmpxchg() {
        let a = arena();
        let p = a.alloc_4k().unwrap();
        a.write(p, 5, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let mut b = [0u8; 12];
        a.read(p, 4, &mut b);
        assert_eq!(b, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]);
        a.write_value(p, 100, 4, 0xAABB_CCDD);
        assert_eq!(a.cmpxchg_value(p, 100, 4, 1, 2), Err(0xAABB_CCDD));
        assert_eq!(a.cmpxchg_value(p, 100, 4, 0xAABB_CCDD, 7), Ok(()));
        assert_eq!(a.read_value(p, 100, 4), 7);
        assert_eq!(a.read_value(p, 104, 4), 0, "the other half is untouched");
        let q = a.alloc_4k().unwrap();
        a.copy_frame(q, p);
        assert!(a.frames_equal(p, q));
    }

    #[test]
    fn allocation_is_thread_safe() {
        let a = std::sync::Arc::new(arena());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || (0..500).map(|_| a.alloc_4k().unwrap()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<_> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 2000);
        assert_eq!(a.allocated_frames(), 2000);
    }
}
