//! The walker target: the production guest walker against the reference
//! walker ([`super::reference`]) over arbitrary paging structures and
//! control state.
//!
//! A [`WalkInput`] is what the fuzzer generates; [`WalkInput::scenario`]
//! turns it into a concrete [`Scenario`] (registers, one access, up to
//! [`MAX_PAGES`] pages of guest memory), biased so that walks go deep:
//! most inputs write a chain of entries from CR3's page down, one per level
//! at the index the address selects, most entries sit at such an index, and
//! most point at one of the scenario's pages. Then
//! [`check_scenario`] runs both walkers from identical copies of the memory
//! and compares the outcome (translation, #PF or #GP), the error code, the
//! faulting or leaf level, the physical address, the page size, and every
//! byte of memory afterwards (the Accessed/Dirty updates). It also checks
//! that `peek` agrees with `walk` and writes nothing, that the walk
//! terminates (a bound on the entries it reads and writes), and, in PAE
//! paging, that both load the PDPTE registers alike (or both #GP).

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::fmt;

use arbitrary::{Arbitrary, Unstructured};

use super::reference::{self, Deviation, RefAccess, RefCpu, RefKind, RefOutcome};
use vmmu::addr::{Gpa, Gva};
use vmmu::arch::control::{CpuFeatures, Cr0, Cr4, Efer, PagingMode};
use vmmu::arch::perm::{Access, AccessKind, Privilege};
use vmmu::walker::{ControlRegs, EntrySize, GuestPaging, PdpteLoadError, PtMemory, Walk, WalkError, load_pdptes};

/// The most pages of guest memory an input places.
pub const MAX_PAGES: usize = 8;
/// The most entries an input writes into one page.
pub const MAX_ENTRIES_PER_PAGE: usize = 24;
/// The most raw bytes an input writes into one page.
pub const MAX_FILL: usize = 64;
/// The most entries one walk (with its restarts) may read and write: a
/// walker that goes past it is taken to loop.
pub const MAX_MEMORY_OPS: u32 = 256;

const PAGE: usize = 4096;

/// The paging mode of an input.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuzzMode {
    /// CR0.PG = 0.
    Unpaged,
    /// 32-bit paging.
    Bits32,
    /// PAE paging.
    Pae,
    /// 4-level paging.
    Level4,
    /// 5-level paging.
    Level5,
}

/// The kind of the access.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuzzKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Who makes the access.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// An explicit access at CPL `cpl % 3` (0, 1 or 2).
    Supervisor {
        /// The CPL, folded into 0..=2.
        cpl: u8,
    },
    /// An explicit access at CPL 3.
    User,
    /// An explicit access at CPL 3 (twice as likely as the others).
    UserAgain,
    /// An implicit supervisor-mode access at CPL `cpl % 4` (a data access;
    /// an implicit fetch is made an explicit one at CPL 0).
    Implicit {
        /// The CPL, folded into 0..=3.
        cpl: u8,
    },
}

/// One 4- or 8-byte entry value, built to be likely meaningful.
///
/// `shape % 8`: 0..=3 point at page `target` of the input as a table (bit
/// 7 clear), 4 points at it with `flags` as they are (bit 7 may make it a
/// large page), 5 and 6 point at the frame `frame`, 7 is `raw` as is.
/// `flags & 0xfff` are the low 12 bits; the present bit is forced unless
/// `flags >> 12` is 0. `noise`: bits 2:0 = 7 flip bit `arg % 64` (if
/// also `arg` bits 9:8 = 3); bit 3
/// aligns `frame` to 1 GiB; bit 4 keeps `frame` below 4 GiB; bits 6:5 = 3
/// put `arg` into the protection key (62:59); bit 7 with `arg` bit 10 puts
/// `arg` into the ignored bits 58:52. `arg >> 12 == 0xf` sets bit 63 (XD).
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueSpec {
    /// What the entry points at (see the type's documentation).
    pub shape: u8,
    /// A page of the input.
    pub target: u8,
    /// A frame number.
    pub frame: u32,
    /// The low bits.
    pub flags: u16,
    /// Extra bits (see the type's documentation).
    pub noise: u8,
    /// The argument of `noise`.
    pub arg: u16,
    /// The raw value.
    pub raw: u64,
}

/// One entry written into a page.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntrySpec {
    /// Where: bit 15 clear, the index the access's address selects at
    /// level `1 + slot % root_level`; bit 15 set, index `slot & 0x3ff`.
    pub slot: u16,
    /// What.
    pub value: ValueSpec,
}

/// One page of guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSpec {
    /// Its frame number.
    pub gfn: u16,
    /// Where `fill` goes in the page.
    pub fill_at: u16,
    /// Raw bytes (at most [`MAX_FILL`]).
    pub fill: Vec<u8>,
    /// Entries (at most [`MAX_ENTRIES_PER_PAGE`]), written after `fill`.
    pub entries: Vec<EntrySpec>,
}

impl<'a> Arbitrary<'a> for PageSpec {
    /// Lengths are drawn uniformly (the derived `Vec` stops at each
    /// element with probability 1/2, which leaves pages almost empty).
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let gfn = u16::arbitrary(u)?;
        let fill_at = u16::arbitrary(u)?;
        let fill_len = if u8::arbitrary(u)? % 4 == 0 {
            u.int_in_range(0..=MAX_FILL)?
        } else {
            0
        };
        let fill = u.bytes(fill_len)?.to_vec();
        let n = u.int_in_range(0..=MAX_ENTRIES_PER_PAGE)?;
        let entries = (0..n)
            .map(|_| EntrySpec::arbitrary(u))
            .collect::<arbitrary::Result<_>>()?;
        Ok(PageSpec {
            gfn,
            fill_at,
            fill,
            entries,
        })
    }
}

/// The pages of an input: 1 to [`MAX_PAGES`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pages(pub Vec<PageSpec>);

impl<'a> Arbitrary<'a> for Pages {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u.int_in_range(1..=MAX_PAGES)?;
        Ok(Pages(
            (0..n)
                .map(|_| PageSpec::arbitrary(u))
                .collect::<arbitrary::Result<_>>()?,
        ))
    }
}

/// A fuzz input for the walker. The fields that decide how deep walks go
/// come first, so that a short input still makes a deep walk.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct WalkInput {
    /// Paging mode.
    pub mode: FuzzMode,
    /// CR0.WP.
    pub cr0_wp: bool,
    /// CR4.PSE.
    pub cr4_pse: bool,
    /// CR4.SMEP.
    pub cr4_smep: bool,
    /// CR4.SMAP.
    pub cr4_smap: bool,
    /// CR4.PKE.
    pub cr4_pke: bool,
    /// EFER.NXE.
    pub efer_nxe: bool,
    /// MAXPHYADDR, folded into 32..=52.
    pub maxphyaddr: u8,
    /// Whether 1-GByte pages are missing (CPUID).
    pub no_gbpages: bool,
    /// Whether PSE-36 is missing (CPUID).
    pub no_pse36: bool,
    /// PKRU.
    pub pkru: u32,
    /// RFLAGS.AC.
    pub rflags_ac: bool,
    /// Who accesses.
    pub who: Who,
    /// What access.
    pub kind: FuzzKind,
    /// The linear address; made canonical for the mode unless
    /// `va_raw % 8 == 0`.
    pub va: u64,
    /// See `va`.
    pub va_raw: u8,
    /// CR3 names page `cr3_page` of the input with low bits `cr3_low`,
    /// unless `cr3_shape % 16 == 0`, when it is `cr3_raw`.
    pub cr3_page: u8,
    /// Low 12 bits of CR3.
    pub cr3_low: u16,
    /// See `cr3_page`.
    pub cr3_shape: u8,
    /// See `cr3_page`.
    pub cr3_raw: u32,
    /// Unless `chain_off % 8 == 0`, a chain of entries is written last,
    /// one per level at the index `va` selects, from CR3's page down:
    /// `chain[l - 1]` at level `l` in page `chain_pages[l - 1]` (the root
    /// in CR3's). Above level 1, shape 7 is raw, 6 at levels 2 and 3 is a
    /// large page at `frame`, every other a table pointer to the next
    /// level's page; at level 1 the entry is as it is.
    /// This is what makes most walks deep.
    pub chain: [ValueSpec; 5],
    /// See `chain`.
    pub chain_pages: [u8; 5],
    /// See `chain`.
    pub chain_off: u8,
    /// PAE: when `Some` and `stale_pdptes_on % 4 == 0`, PDPTE registers
    /// that no longer match memory (the PDPT changed after the CR3 load);
    /// else they are loaded from memory.
    pub stale_pdptes: Option<[ValueSpec; 4]>,
    /// See `stale_pdptes`.
    pub stale_pdptes_on: u8,
    /// Guest memory.
    pub pages: Pages,
}

/// A concrete walk scenario: everything both walkers are given.
#[derive(Clone, PartialEq, Eq)]
pub struct Scenario {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// PKRU.
    pub pkru: u32,
    /// MAXPHYADDR.
    pub maxphyaddr: u8,
    /// 1-GByte pages supported.
    pub gbpages: bool,
    /// PSE-36 supported.
    pub pse36: bool,
    /// The access.
    pub access: RefAccess,
    /// Its linear address.
    pub va: u64,
    /// PAE: stale PDPTE registers; `None`: load them at CR3 load.
    pub stale_pdptes: Option<[u64; 4]>,
    /// Guest memory: frame number and 4096 bytes, distinct frames.
    pub pages: Vec<(u64, Vec<u8>)>,
}

impl fmt::Debug for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} pkru={:#x} maxphyaddr={} gbpages={} pse36={}",
            self.cr0, self.cr3, self.cr4, self.efer, self.pkru, self.maxphyaddr, self.gbpages, self.pse36
        )?;
        writeln!(
            f,
            "access={:?} va={:#x} stale_pdptes={:x?}",
            self.access, self.va, self.stale_pdptes
        )?;
        for (gfn, bytes) in &self.pages {
            write!(f, "page gfn {gfn:#x}:")?;
            for (i, chunk) in bytes.chunks(8).enumerate() {
                let v = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
                if v != 0 {
                    write!(f, " [{:#x}]={v:#x}", i * 8)?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

impl ValueSpec {
    /// The entry value; `gfns` are the input's pages, `wide` is false for
    /// 4-byte entries; `to` overrides the page a table pointer names.
    fn value(&self, gfns: &[u64], wide: bool, to: Option<u64>) -> u64 {
        let shape = self.shape % 8;
        let flags = self.flags as u64 & 0xfff;
        let frame = {
            let mut f = self.frame as u64;
            if self.noise & 0x08 != 0 {
                f &= !0x3ffff;
            }
            if self.noise & 0x10 != 0 {
                f &= 0xf_ffff;
            }
            f
        };
        let page = |i: u8| to.unwrap_or_else(|| gfns[i as usize % gfns.len()]);
        let mut v = match shape {
            0..=3 if !gfns.is_empty() || to.is_some() => (page(self.target) << 12) | (flags & !0x80),
            4 if !gfns.is_empty() || to.is_some() => (page(self.target) << 12) | flags,
            0..=6 => (frame << 12) | flags,
            _ => self.raw,
        };
        if shape != 7 {
            if self.flags >> 12 != 0 {
                v |= 1;
            }
            if self.noise & 7 == 7 && (self.arg >> 8) & 3 == 3 {
                v ^= 1 << (self.arg % 64);
            }
            if self.noise & 0x60 == 0x60 {
                v = (v & !(0xf << 59)) | ((self.arg as u64 & 0xf) << 59);
            }
            if self.noise & 0x80 != 0 && self.arg & 0x400 != 0 {
                v |= (self.arg as u64 & 0x7f) << 52;
            }
            if self.arg >> 12 == 0xf {
                v |= 1 << 63;
            }
        }
        if wide { v } else { v & 0xffff_ffff }
    }
}

impl WalkInput {
    /// The concrete scenario this input describes.
    pub fn scenario(&self) -> Scenario {
        let mode = self.mode;
        let mut cr0 = Cr0::PE.bits();
        if mode != FuzzMode::Unpaged {
            cr0 |= Cr0::PG.bits();
        }
        if self.cr0_wp {
            cr0 |= Cr0::WP.bits();
        }
        let mut cr4 = 0;
        for (on, bit) in [
            (self.cr4_pse, Cr4::PSE),
            (self.cr4_smep, Cr4::SMEP),
            (self.cr4_smap, Cr4::SMAP),
            (self.cr4_pke, Cr4::PKE),
            (
                matches!(mode, FuzzMode::Pae | FuzzMode::Level4 | FuzzMode::Level5),
                Cr4::PAE,
            ),
            (mode == FuzzMode::Level5, Cr4::LA57),
        ] {
            if on {
                cr4 |= bit.bits();
            }
        }
        let mut efer = 0;
        if matches!(mode, FuzzMode::Level4 | FuzzMode::Level5) {
            efer |= (Efer::LME | Efer::LMA).bits();
        }
        if self.efer_nxe {
            efer |= Efer::NXE.bits();
        }
        let (kind, cpl, implicit) = match (self.kind, self.who) {
            (k, Who::Supervisor { cpl }) => (k, cpl % 3, false),
            (k, Who::User | Who::UserAgain) => (k, 3, false),
            (FuzzKind::Fetch, Who::Implicit { .. }) => (FuzzKind::Fetch, 0, false),
            (k, Who::Implicit { cpl }) => (k, cpl % 4, true),
        };
        let access = RefAccess {
            kind: match kind {
                FuzzKind::Read => RefKind::Read,
                FuzzKind::Write => RefKind::Write,
                FuzzKind::Fetch => RefKind::Fetch,
            },
            cpl,
            implicit,
            rflags_ac: self.rflags_ac,
        };
        let va = match mode {
            _ if self.va_raw.is_multiple_of(8) => self.va,
            FuzzMode::Level4 => (((self.va << 16) as i64) >> 16) as u64,
            FuzzMode::Level5 => (((self.va << 7) as i64) >> 7) as u64,
            _ => self.va & 0xffff_ffff,
        };

        // Distinct frames, in input order.
        let mut gfns: Vec<u64> = Vec::new();
        for p in &self.pages.0 {
            if !gfns.contains(&(p.gfn as u64)) {
                gfns.push(p.gfn as u64);
            }
        }
        let cr3 = if self.cr3_shape.is_multiple_of(16) || gfns.is_empty() {
            self.cr3_raw as u64
        } else {
            (gfns[self.cr3_page as usize % gfns.len()] << 12) | (self.cr3_low as u64 & 0xfff)
        };

        let maxphyaddr = 32 + self.maxphyaddr % 21;
        let (wide, bits_per_level, root_level) = match mode {
            FuzzMode::Unpaged => (true, 9, 1),
            FuzzMode::Bits32 => (false, 10, 2),
            FuzzMode::Pae => (true, 9, 3),
            FuzzMode::Level4 => (true, 9, 4),
            FuzzMode::Level5 => (true, 9, 5),
        };
        let esize = if wide { 8 } else { 4 };
        let mut memory: Vec<(u64, Vec<u8>)> = gfns.iter().map(|&g| (g, vec![0u8; PAGE])).collect();
        for p in &self.pages.0 {
            let Some(slot) = memory.iter().position(|(g, _)| *g == p.gfn as u64) else {
                continue;
            };
            let bytes = &mut memory[slot].1;
            let at = p.fill_at as usize % PAGE;
            for (i, b) in p.fill.iter().enumerate() {
                if at + i < PAGE {
                    bytes[at + i] = *b;
                }
            }
            for e in &p.entries {
                let offset = if e.slot & 0x8000 == 0 {
                    let level = 1 + (e.slot % root_level) as u32;
                    let index = (va >> (12 + bits_per_level * (level - 1))) & ((1 << bits_per_level) - 1);
                    if mode == FuzzMode::Pae && level == 3 {
                        // The PDPT sits at CR3 bits 11:5 within its page.
                        (cr3 & 0xfe0) as usize + 8 * (index as usize & 3)
                    } else {
                        index as usize * esize
                    }
                } else {
                    (e.slot as usize & 0x3ff) * esize % PAGE
                };
                let value = e.value.value(&gfns, wide, None);
                bytes[offset..offset + esize].copy_from_slice(&value.to_le_bytes()[..esize]);
            }
        }
        let cr3_gfn = cr3 >> 12;
        if !self.chain_off.is_multiple_of(8) && mode != FuzzMode::Unpaged && gfns.contains(&cr3_gfn) {
            let page_at = |level: u32| {
                if level == root_level as u32 {
                    cr3_gfn
                } else {
                    gfns[self.chain_pages[level as usize - 1] as usize % gfns.len()]
                }
            };
            for level in (1..=root_level as u32).rev() {
                let mut spec = self.chain[level as usize - 1];
                if level > 1 {
                    spec.shape = match spec.shape % 8 {
                        6 if level <= 3 => 6,
                        7 => 7,
                        _ => 0,
                    };
                }
                let to = (level > 1 && spec.shape <= 4).then(|| page_at(level - 1));
                let mut value = spec.value(&gfns, wide, to);
                if level > 1 && spec.shape == 6 {
                    value |= 0x80; // a large page, if the level allows one
                }
                let index = (va >> (12 + bits_per_level * (level - 1))) & ((1 << bits_per_level) - 1);
                let offset = if mode == FuzzMode::Pae && level == 3 {
                    (cr3 & 0xfe0) as usize + 8 * (index as usize & 3)
                } else {
                    index as usize * esize
                };
                let gfn = page_at(level);
                if let Some((_, bytes)) = memory.iter_mut().find(|(g, _)| *g == gfn) {
                    bytes[offset..offset + esize].copy_from_slice(&value.to_le_bytes()[..esize]);
                }
            }
            // PAE: mostly, PDPTEs without the bits reserved there (bits 2:1,
            // 8:5, 63:MAXPHYADDR), so that the CR3 load succeeds.
            if mode == FuzzMode::Pae && self.chain[2].noise & 7 != 7 {
                let keep = 0x0000_0fff_ffff_fe19 & ((1u64 << maxphyaddr) - 1);
                let base = (cr3 & 0xfe0) as usize;
                if let Some((_, bytes)) = memory.iter_mut().find(|(g, _)| *g == cr3_gfn) {
                    for i in 0..4 {
                        let at = base + 8 * i;
                        let v = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8])) & keep;
                        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        let stale_pdptes = match (&self.stale_pdptes, mode) {
            (Some(specs), FuzzMode::Pae) if self.stale_pdptes_on.is_multiple_of(4) => {
                Some(specs.map(|s| s.value(&gfns, true, None)))
            }
            _ => None,
        };
        Scenario {
            cr0,
            cr3,
            cr4,
            efer,
            pkru: self.pkru,
            maxphyaddr,
            gbpages: !self.no_gbpages,
            pse36: !self.no_pse36,
            access,
            va,
            stale_pdptes,
            pages: memory,
        }
    }
}

/// What a checked walk did (for coverage statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalkSummary {
    /// PAE: loading the PDPTE registers raised #GP (in both).
    PdpteLoadGp,
    /// PAE: the stale PDPTE registers could not have been loaded (a
    /// reserved bit): only termination was checked.
    ImpossiblePdptes,
    /// A translation by an entry at `level`.
    Translation {
        /// The mode's name.
        mode: &'static str,
        /// The leaf level.
        level: u8,
    },
    /// A #PF at `level`.
    PageFault {
        /// The mode's name.
        mode: &'static str,
        /// The faulting level.
        level: u8,
        /// The kind: "not-present", "reserved" or "rights".
        why: &'static str,
    },
    /// #GP for a non-canonical address.
    NonCanonical,
}

/// The scenario's guest memory: its pages, every other byte zero. It
/// counts the entries read and written and panics when one walk goes past
/// [`MAX_MEMORY_OPS`]: the walker must terminate.
struct FuzzMemory {
    pages: RefCell<Vec<(u64, Vec<u8>)>>,
    ops: Cell<u32>,
}

impl FuzzMemory {
    fn new(s: &Scenario) -> FuzzMemory {
        FuzzMemory {
            pages: RefCell::new(s.pages.clone()),
            ops: Cell::new(0),
        }
    }

    fn snapshot(&self) -> Vec<(u64, Vec<u8>)> {
        self.pages.borrow().clone()
    }

    fn byte(&self, addr: u64) -> u8 {
        let gfn = addr >> 12;
        self.pages
            .borrow()
            .iter()
            .find(|(g, _)| *g == gfn)
            .map_or(0, |(_, bytes)| bytes[(addr & 0xfff) as usize])
    }

    fn read_uint(&self, addr: u64, size: usize) -> u64 {
        let mut v = 0u64;
        for i in (0..size).rev() {
            v = (v << 8) | self.byte(addr.wrapping_add(i as u64)) as u64;
        }
        v
    }

    /// Writes the low `size` bytes of `value`; bytes outside the pages are
    /// dropped (a walk only writes entries it read as present, so never there).
    fn write_uint(&self, addr: u64, size: usize, value: u64) {
        let mut pages = self.pages.borrow_mut();
        for i in 0..size {
            let a = addr.wrapping_add(i as u64);
            if let Some((_, bytes)) = pages.iter_mut().find(|(g, _)| *g == a >> 12) {
                bytes[(a & 0xfff) as usize] = (value >> (8 * i)) as u8;
            }
        }
    }

    fn tick(&self) {
        let n = self.ops.get() + 1;
        self.ops.set(n);
        assert!(
            n <= MAX_MEMORY_OPS,
            "the walker did not terminate: over {MAX_MEMORY_OPS} paging-entry reads and writes in one walk"
        );
    }
}

impl PtMemory for FuzzMemory {
    type Error = Infallible;
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Infallible> {
        self.tick();
        Ok(self.read_uint(gpa.raw(), size.bytes() as usize))
    }
    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Infallible> {
        self.tick();
        let n = size.bytes() as usize;
        let current = self.read_uint(gpa.raw(), n);
        if current != old {
            return Ok(Err(current));
        }
        self.write_uint(gpa.raw(), n, new);
        Ok(Ok(()))
    }
}

/// The first difference between two snapshots, as text.
fn first_difference(a: &[(u64, Vec<u8>)], b: &[(u64, Vec<u8>)]) -> Option<String> {
    for ((gfn, pa), (_, pb)) in a.iter().zip(b) {
        for (w, (ca, cb)) in pa.chunks(8).zip(pb.chunks(8)).enumerate() {
            if ca != cb {
                let va = u64::from_le_bytes(ca.try_into().unwrap_or([0; 8]));
                let vb = u64::from_le_bytes(cb.try_into().unwrap_or([0; 8]));
                return Some(format!("at gpa {:#x}: {va:#x} vs {vb:#x}", (gfn << 12) + 8 * w as u64));
            }
        }
    }
    None
}

/// The production walker's outcome in the reference's terms.
fn production_outcome(r: &Result<Walk, WalkError<Infallible>>) -> RefOutcome {
    match r {
        Ok(w) => RefOutcome::Translation {
            gpa: w.gpa.raw(),
            page_size: w.page_size.bytes(),
            level: w.level,
        },
        Err(WalkError::PageFault(pf)) => RefOutcome::PageFault {
            error_code: pf.error_code.bits(),
            level: pf.level,
        },
        Err(WalkError::NonCanonical) => RefOutcome::GeneralProtection,
        Err(WalkError::Memory { error, .. }) => match *error {},
    }
}

/// Runs the production walker and the reference (with `deviation`) on
/// `s`; `Err` describes the first disagreement.
pub fn check_scenario(s: &Scenario, deviation: Deviation) -> Result<WalkSummary, String> {
    let regs = ControlRegs {
        cr0: Cr0::from_bits_truncate(s.cr0),
        cr4: Cr4::from_bits_truncate(s.cr4),
        efer: Efer::from_bits_truncate(s.efer),
    };
    let features = CpuFeatures {
        maxphyaddr: s.maxphyaddr,
        gbpages: s.gbpages,
        pse36: s.pse36,
        ..CpuFeatures::default()
    };
    let paging = GuestPaging::new(&regs, &features);
    let prod_mem = FuzzMemory::new(s);
    let ref_mem = FuzzMemory::new(s);
    let fail = |what: String| Err(format!("{what}\nscenario:\n{s:?}"));

    let mut ref_cpu = RefCpu {
        cr0: s.cr0,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        pkru: s.pkru,
        maxphyaddr: s.maxphyaddr,
        gbpages: s.gbpages,
        pse36: s.pse36,
        pdptes: [0; 4],
    };
    let ref_read = |a: u64, n: usize| ref_mem.read_uint(a, n);
    let mut possible = true;
    let mut pdptes = [0u64; 4];
    if paging.mode() == PagingMode::Pae {
        match s.stale_pdptes {
            None => {
                let prod = load_pdptes(&prod_mem, s.cr3, &features);
                let reference = reference::load_pdptes(&ref_read, s.cr3, s.maxphyaddr);
                match (prod, reference) {
                    (Ok(p), Ok(r)) if p == r => pdptes = p,
                    (Err(PdpteLoadError::Reserved { index, value }), Err(gp))
                        if index == gp.index && value == gp.value =>
                    {
                        return Ok(WalkSummary::PdpteLoadGp);
                    }
                    (p, r) => return fail(format!("PDPTE load: walker {p:x?}, reference {r:x?}")),
                }
            }
            Some(regs) => {
                pdptes = regs;
                // Registers with a reserved bit cannot have been loaded.
                let as_memory = |a: u64, _n: usize| regs[((a >> 3) & 3) as usize];
                possible = reference::load_pdptes(&as_memory, 0, s.maxphyaddr).is_ok();
            }
        }
        ref_cpu.pdptes = pdptes;
    }

    let kind = match s.access.kind {
        RefKind::Read => AccessKind::Read,
        RefKind::Write => AccessKind::Write,
        RefKind::Fetch => AccessKind::Fetch,
    };
    let access = Access {
        kind,
        privilege: if s.access.implicit {
            Privilege::ImplicitSupervisor
        } else if s.access.cpl == 3 {
            Privilege::User
        } else {
            Privilege::Supervisor
        },
        rflags_ac: s.access.rflags_ac,
    };
    let root = paging.root(s.cr3, pdptes);
    prod_mem.ops.set(0);
    let peeked = paging.peek(&prod_mem, &root, Gva::new(s.va), access, s.pkru);
    if let Some(d) = first_difference(&s.pages, &prod_mem.snapshot()) {
        return fail(format!("peek wrote to memory: {d}"));
    }
    prod_mem.ops.set(0);
    let walked = paging.walk(&prod_mem, &root, Gva::new(s.va), access, s.pkru);
    let got = production_outcome(&walked);
    if production_outcome(&peeked) != got {
        return fail(format!("peek {:x?} but walk {got:x?}", production_outcome(&peeked)));
    }
    if !possible {
        return Ok(WalkSummary::ImpossiblePdptes);
    }

    let expected = reference::walk_with(&ref_cpu, s.access, s.va, &ref_read, deviation);
    for &(addr, size, bits) in &expected.updates {
        ref_mem.write_uint(addr, size, ref_mem.read_uint(addr, size) | bits);
    }
    if got != expected.outcome {
        return fail(format!("walker {got:x?}, reference {:x?}", expected.outcome));
    }
    if let Some(d) = first_difference(&prod_mem.snapshot(), &ref_mem.snapshot()) {
        return fail(format!(
            "memory after the access differs (walker vs reference) {d}; outcome {got:x?}"
        ));
    }
    let mode = paging.mode().name();
    Ok(match got {
        RefOutcome::Translation { level, .. } => WalkSummary::Translation { mode, level },
        RefOutcome::PageFault { error_code, level } => WalkSummary::PageFault {
            mode,
            level,
            why: if error_code & 8 != 0 {
                "reserved"
            } else if error_code & 1 != 0 {
                "rights"
            } else {
                "not-present"
            },
        },
        RefOutcome::GeneralProtection => WalkSummary::NonCanonical,
    })
}

/// The fuzz entry point: checks one input, panicking with both outcomes
/// and the scenario if the production walker and the reference disagree.
pub fn walk_one(input: &WalkInput) -> WalkSummary {
    match check_scenario(&input.scenario(), Deviation::None) {
        Ok(summary) => summary,
        Err(e) => panic!("the walker disagrees with the SDM reference: {e}"),
    }
}
