//! The whole-VM target: an arbitrary program of guest operations (stores
//! to the guest's own page tables, control-register writes, INVLPG and
//! INVPCID, reads, writes and fetches) and host/VMM operations (host memory
//! churn, memslot changes, dirty-log harvests, zap-all, the shadow page
//! limit) run on one vCPU under the shadow or the TDP MMU, every result
//! judged from the x86 side.
//!
//! The guest is a small fixed set of page tables (two roots, one table per
//! level, a second leaf table, and a table that maps all of them at a fixed
//! linear address: the self-map) over a few data frames, in 4-level,
//! 5-level or 32-bit paging. The guest edits its tables with CPL 0 stores
//! through the self-map, as a guest kernel does, so the shadow MMU sees
//! them as guest writes (write-protected tables, emulation, unsync pages).
//! Entry values are arbitrary but their address bits always name one of a
//! fixed set of frames ([`FRAMES`]: the tables themselves, of any level,
//! the data frames, frames of a second memslot at each of its placements,
//! and a frame with no memslot), so every walk stays inside the memory the
//! checker snapshots.
//!
//! The checker ([`run`]) panics, naming the op index, the op, what was
//! expected and what happened, when:
//!
//! - an access's result (the gpa, the #PF error code or #GP) is not one
//!   x86 allows: the guest walker ([`GuestPaging::peek`]) on the current
//!   guest memory, or, for a translation, the walker on a page-table state
//!   that held since the page's last flush, under the root and PCID it
//!   was cached with (as `tests/guest_model.rs` judges: a TLB without
//!   paging-structure caches). Flushes follow the SDM: INVLPG (the current
//!   PCID and global entries), INVPCID types 0-3, MOV to CR3 (non-global
//!   entries of the new PCID, nothing with the no-flush bit), CR4.PGE and
//!   EFER.NXE changes (everything), a #PF (the page, current PCID);
//! - data disagrees: a read returns something else than the VMM sees at
//!   the reported gpa, or guest memory is not the last value written there
//!   (the walker's Accessed/Dirty updates aside);
//! - a gpa without a memslot (or a write to a read-only one) is not
//!   reported as MMIO, or one with a memslot is;
//! - a write completed while its memslot logged dirty pages is missing
//!   from the next harvest;
//! - the MMU's audit reports a violation, or the vCPU's isolation counters
//!   (`freed_frame_accesses`, `invalid_root_uses`) move;
//! - the vCPU or the MMU returns an error (nothing here is the host's
//!   fault: every op is guest-controlled or a legal VMM request).

use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};

use vmmu::addr::{Gfn, Gpa, Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Cr0, Cr4, Efer};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::arch::pte::PT_GLOBAL;
use vmmu::cpu::vcpu::{AccessResult, GuestFault, Vcpu};
use vmmu::host::{HostAddressSpace, VmaFlags};
use vmmu::mem::{GuestMemory, MemoryRegion, MemslotFlags, MemslotTable};
use vmmu::vm::config::VmConfig;
use vmmu::vm::{Mmu, MmuKind, VmBuilder};
use vmmu::walker::{ControlRegs, EntrySize, GuestPaging, PtMemory, WalkError};

/// The most ops of a program that run (the rest are ignored).
pub const MAX_OPS: usize = 64;

const PAGE: u64 = 0x1000;
/// Memslot 0: guest RAM at gpa 0.
const RAM: u64 = 2 << 20;
const RAM_HVA: u64 = 0x4000_0000;
/// Memslot 1: 2 MiB of its own host memory, placed at one of
/// [`SLOT1_AT`] (two 2 MiB-aligned placements and a misaligned one).
const SLOT1_SIZE: u64 = 2 << 20;
const SLOT1_HVA: u64 = 0x8000_0000;
const SLOT1_AT: [u64; 3] = [0x40_0000, 0x60_0000, 0x80_3000];
/// A frame no memslot ever covers.
const MMIO_FRAME: u64 = 0x30_0000;

/// The guest's tables. In 4-level paging `L4` is a spare table; in 32-bit
/// paging the roots are page directories and `L4`, `PDPT`, `PD` spares.
const ROOT_A: u64 = 0x1000;
const ROOT_B: u64 = 0x2000;
const L4: u64 = 0x3000;
const PDPT: u64 = 0x4000;
const PD: u64 = 0x5000;
/// The leaf table of linear 0..2 MiB (0..4 MiB in 32-bit paging).
const PT: u64 = 0x6000;
/// The self-map: maps frames 0..[`SELF_FRAMES`] at [`self_va`].
const PT_SELF: u64 = 0x7000;
/// A second leaf table, linked nowhere at first.
const PT2: u64 = 0x8000;
/// The tables the guest edits (`WriteEntry::table` indexes this).
pub const TABLES: [u64; 8] = [ROOT_A, ROOT_B, L4, PDPT, PD, PT, PT_SELF, PT2];
/// Data frames the leaf tables map at first.
const DATA: u64 = 0x10000;
const DATA_PAGES: u64 = 8;
/// Frames the self-map maps (tables and data).
const SELF_FRAMES: u64 = 0x20;

/// Every frame an entry the guest writes may point at: the tables (so a
/// table can point at itself or at a table of another level), the data
/// frames, frame 0 (a base for 2 MiB/1 GiB/4 MiB pages), three frames of
/// each placement of memslot 1 (its first is 2 MiB-aligned in two of
/// them), and a frame without a memslot.
pub const FRAMES: [u64; 28] = [
    ROOT_A,
    ROOT_B,
    L4,
    PDPT,
    PD,
    PT,
    PT_SELF,
    PT2,
    DATA,
    DATA + PAGE,
    DATA + 2 * PAGE,
    DATA + 3 * PAGE,
    DATA + 4 * PAGE,
    DATA + 5 * PAGE,
    DATA + 6 * PAGE,
    DATA + 7 * PAGE,
    0,
    SLOT1_AT[0],
    SLOT1_AT[0] + PAGE,
    SLOT1_AT[0] + 2 * PAGE,
    SLOT1_AT[1],
    SLOT1_AT[1] + PAGE,
    SLOT1_AT[1] + 2 * PAGE,
    SLOT1_AT[2],
    SLOT1_AT[2] + PAGE,
    SLOT1_AT[2] + 2 * PAGE,
    MMIO_FRAME,
    DATA + 8 * PAGE,
];

/// Address bits an entry's frame replaces (12..=45: below MAXPHYADDR 46,
/// so the bits above stay arbitrary and may be reserved).
const ADDR_MASK: u64 = ((1 << 46) - 1) & !0xfff;

/// Number of linear pages the program touches ([`VmMode::pages`]).
pub const N_PAGES: usize = 22;

/// Which MMU runs the guest.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuChoice {
    /// The shadow MMU.
    Shadow,
    /// The TDP MMU (EPT).
    Tdp,
}

/// The guest's paging mode.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmMode {
    /// 4-level paging (IA-32e).
    Level4,
    /// 5-level paging (IA-32e with CR4.LA57).
    Level5,
    /// 32-bit paging with CR4.PSE (4 MiB pages).
    Bits32,
}

impl VmMode {
    fn long(self) -> bool {
        self != VmMode::Bits32
    }

    /// Bytes per entry.
    fn entry(self) -> u64 {
        if self.long() { 8 } else { 4 }
    }

    /// Entries per table.
    fn entries(self) -> u64 {
        PAGE / self.entry()
    }

    /// Where the self-map shows frame 0 (the second page-directory entry's
    /// region).
    fn self_va(self) -> u64 {
        if self.long() { 2 << 20 } else { 4 << 20 }
    }

    /// The linear addresses the program touches: pages 0..8 of the edited
    /// table, the self-map's view of each table and of the first data
    /// frame, and a few addresses through other entries of each level (a
    /// high-half alias, unmapped regions, a non-canonical address).
    pub fn pages(self) -> [u64; N_PAGES] {
        let s = self.self_va();
        let mut p = [0u64; N_PAGES];
        for (i, v) in p.iter_mut().enumerate().take(8) {
            *v = i as u64 * PAGE;
        }
        for (i, t) in TABLES.iter().enumerate() {
            p[8 + i] = s + t;
        }
        p[16] = s + DATA;
        let rest: [u64; 5] = match self {
            VmMode::Level4 => [
                0x4000_0000,
                0x80_0000_0000,
                0xffff_ff80_0000_0000,
                0x0000_8000_0000_0000,
                4 << 20,
            ],
            VmMode::Level5 => [
                0x4000_0000,
                0x80_0000_0000,
                0xffff_ff80_0000_0000,
                0x0100_0000_0000_0000,
                4 << 20,
            ],
            VmMode::Bits32 => [0x80_0000, 0xffc0_0000, 0xc000_0000, 0xffff_f000, 0x80_1000],
        };
        p[17..].copy_from_slice(&rest);
        p
    }

    /// The entry index a [`VmOp::WriteEntry`] choice names.
    fn index(self, choice: u8) -> u64 {
        match choice {
            0..=16 => u64::from(choice),
            17 => self.entries() - 1,
            _ if self.long() => 510,
            _ => 768,
        }
    }
}

/// A host operation on one page of guest memory (the host kernel's).
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOp {
    /// THP collapse of the page's 2 MiB block.
    Collapse,
    /// THP split of the page's 2 MiB block.
    Split,
    /// Page migration.
    Migrate,
    /// Swap-out.
    SwapOut,
    /// Swap-in.
    SwapIn,
    /// KSM merge with another page (if their contents are equal).
    Ksm,
    /// `mprotect` read-only, then writable again.
    Mprotect,
    /// Page reclaim's aging of the page without a flush (`clear_young`).
    Age,
}

/// A VMM operation on the memslots.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotOp {
    /// Creates memslot 1 (if absent) at placement `at % 3`.
    Create {
        /// The placement.
        at: u8,
        /// `KVM_MEM_READONLY`.
        readonly: bool,
        /// `KVM_MEM_LOG_DIRTY_PAGES`.
        log: bool,
    },
    /// Deletes memslot 1.
    Delete,
    /// Moves memslot 1 to placement `at % 3`.
    Move {
        /// The placement.
        at: u8,
    },
    /// Turns dirty logging of memslot `slot % 2` on or off.
    Log {
        /// The memslot.
        slot: u8,
        /// On or off.
        on: bool,
    },
    /// Deletes memslot 1 and creates it again with READONLY flipped.
    ToggleReadonly,
}

/// The kind of a guest access.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

impl Kind {
    fn access_kind(self) -> AccessKind {
        match self {
            Kind::Read => AccessKind::Read,
            Kind::Write => AccessKind::Write,
            Kind::Fetch => AccessKind::Fetch,
        }
    }
}

/// One operation of a program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOp {
    /// The guest stores `value` (its low 32 bits in 32-bit paging) to an
    /// entry of table `TABLES[table]`, at CPL 0 through the self-map.
    WriteEntry {
        /// Index into [`TABLES`].
        table: u8,
        /// The entry: 0..=16, 17 = the last, 18 = 510 (768 in 32-bit).
        index: u8,
        /// The value stored.
        value: u64,
    },
    /// MOV to CR3: root A or B, with a PCID (0..=3, under CR4.PCIDE) and
    /// the no-flush bit.
    MovCr3 {
        /// Root B rather than A.
        root_b: bool,
        /// The PCID.
        pcid: u16,
        /// CR3 bit 63.
        noflush: bool,
    },
    /// MOV to CR0 of WP.
    SetWp(bool),
    /// MOV to CR4 of SMEP.
    SetSmep(bool),
    /// MOV to CR4 of SMAP.
    SetSmap(bool),
    /// MOV to CR4 of PGE.
    SetPge(bool),
    /// WRMSR of EFER.NXE (the vCPU's state reloaded).
    SetNxe(bool),
    /// INVLPG of page `page` of [`VmMode::pages`].
    Invlpg {
        /// The page.
        page: u8,
    },
    /// INVPCID of type `kind` (0..=3).
    Invpcid {
        /// The type.
        kind: u8,
        /// The descriptor's PCID (0..=3).
        pcid: u16,
        /// The descriptor's page (type 0).
        page: u8,
    },
    /// A guest access.
    Access {
        /// The page.
        page: u8,
        /// The byte offset (aligned to `size`).
        offset: u16,
        /// 1, 2, 4 or 8 bytes.
        size: u8,
        /// Read, write or fetch.
        kind: Kind,
        /// At CPL 3 rather than 0.
        user: bool,
        /// RFLAGS.AC.
        ac: bool,
        /// What a write stores.
        value: u64,
    },
    /// The host changes the page `page` of [`host_pages`] (and `other`,
    /// for KSM).
    Host {
        /// What the host does.
        op: HostOp,
        /// The page.
        page: u8,
        /// The other page of a KSM merge.
        other: u8,
    },
    /// A memslot change.
    Slot(SlotOp),
    /// `KVM_GET_DIRTY_LOG` of memslot `slot` (0 or 1).
    GetDirtyLog {
        /// The memslot.
        slot: u16,
    },
    /// `KVM_CLEAR_DIRTY_LOG` of memslot `slot`'s first 64 pages (with
    /// manual protection).
    ClearDirtyLog {
        /// The memslot.
        slot: u16,
        /// The pages to clear.
        mask: u64,
    },
    /// Zap everything (TDP: fast zap and the invalidated roots' zap;
    /// shadow: every page).
    ZapAll,
    /// The shadow MMU's page limit: the minimum, or the default again
    /// (nothing on the TDP MMU).
    MmuPages {
        /// The minimum.
        small: bool,
    },
    /// WRPKRU.
    Wrpkru(u32),
    /// MOV to CR4 of PKE (the vCPU's state reloaded).
    SetPke(bool),
    /// One run of the NX huge page recovery worker (its ratio from the
    /// configuration, at least 1).
    NxRecover,
    /// `KVM_PRE_FAULT_MEMORY` of `pages` 4K pages from gpa `first * 16K`
    /// (TDP only; memslot 0 and past it, where it stops).
    PreFault {
        /// The first page, in 16 KiB steps over the first 4 MiB.
        first: u8,
        /// Pages.
        pages: u8,
    },
}

/// An entry value: mostly a valid-looking entry pointing at one of
/// [`FRAMES`], else arbitrary bits with the frame's address.
fn entry_value(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    let target = FRAMES[u.choose_index(FRAMES.len())?];
    let style = u.int_in_range(0..=9u8)?;
    let bits: u16 = u.arbitrary()?;
    Ok(match style {
        0..=6 => {
            let mut v = target | 1;
            let flag = |mask: u16| bits & mask == mask;
            for (mask, bit) in [(1, 1u64 << 1), (2, 1 << 2), (4, 1 << 5), (8, 1 << 6), (0x40, 1 << 8)] {
                if flag(mask) {
                    v |= bit;
                }
            }
            if flag(0x30) {
                v |= 1 << 7; // PS
            }
            if flag(0x180) {
                v |= 1 << 63; // XD
            }
            if flag(0x600) {
                v &= !1; // not present
            }
            if flag(0x3800) {
                v |= 1 << 51; // reserved
            }
            v
        }
        7 => target | 0x7,
        _ => (u.arbitrary::<u64>()? & !ADDR_MASK) | target,
    })
}

impl<'a> Arbitrary<'a> for VmOp {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        // Half the pages named are those of the edited leaf table.
        let page = |u: &mut Unstructured<'a>| -> arbitrary::Result<u8> {
            Ok(if u.ratio(1, 2)? {
                u.int_in_range(0..=7)?
            } else {
                u.choose_index(N_PAGES)? as u8
            })
        };
        let sel = u.int_in_range(0..=105u8)?;
        Ok(match sel {
            0..=23 => VmOp::WriteEntry {
                // Mostly the leaf table and the directory above it, mostly
                // at the entries the touched pages use.
                table: match u.int_in_range(0..=9u8)? {
                    0..=3 => 5,
                    4..=5 => 4,
                    _ => u.choose_index(TABLES.len())? as u8,
                },
                index: if u.ratio(2, 3)? {
                    u.int_in_range(0..=7)?
                } else {
                    u.int_in_range(0..=18)?
                },
                value: entry_value(u)?,
            },
            24..=53 => {
                let size = [8u8, 8, 4, 1, 2, 8][u.choose_index(6)?];
                let qword = if u.ratio(1, 2)? {
                    u.int_in_range(0..=17u16)?
                } else {
                    u.int_in_range(0..=511)?
                };
                let within = u.int_in_range(0..=7u16)? / u16::from(size) * u16::from(size);
                VmOp::Access {
                    page: page(u)?,
                    offset: qword * 8 + within,
                    size,
                    kind: u.arbitrary()?,
                    user: u.arbitrary()?,
                    ac: u.ratio(1, 4)?,
                    value: if u.ratio(1, 2)? {
                        entry_value(u)?
                    } else {
                        u.arbitrary()?
                    },
                }
            }
            54..=58 => VmOp::MovCr3 {
                root_b: u.arbitrary()?,
                pcid: u.int_in_range(0..=3)?,
                noflush: u.arbitrary()?,
            },
            59..=63 => VmOp::Invlpg { page: page(u)? },
            64..=66 => VmOp::Invpcid {
                kind: u.int_in_range(0..=3)?,
                pcid: u.int_in_range(0..=3)?,
                page: page(u)?,
            },
            67 => VmOp::SetWp(u.arbitrary()?),
            68 => VmOp::SetSmep(u.arbitrary()?),
            69 => VmOp::SetSmap(u.arbitrary()?),
            70 => VmOp::SetPge(u.arbitrary()?),
            71 => VmOp::SetNxe(u.arbitrary()?),
            72..=81 => VmOp::Host {
                op: u.arbitrary()?,
                page: u.choose_index(HOST_PAGES)? as u8,
                other: u.choose_index(HOST_PAGES)? as u8,
            },
            82..=88 => VmOp::Slot(u.arbitrary()?),
            89..=92 => VmOp::GetDirtyLog {
                slot: u.int_in_range(0..=1)?,
            },
            93..=94 => VmOp::ClearDirtyLog {
                slot: u.int_in_range(0..=1)?,
                mask: u.arbitrary()?,
            },
            95..=97 => VmOp::ZapAll,
            98..=99 => VmOp::MmuPages { small: u.arbitrary()? },
            100..=101 => VmOp::Wrpkru(if u.ratio(1, 2)? {
                // A few keys access- or write-disabled.
                u.arbitrary::<u32>()? & u.arbitrary::<u32>()?
            } else {
                0
            }),
            102 => VmOp::SetPke(u.arbitrary()?),
            103 => VmOp::NxRecover,
            _ => VmOp::PreFault {
                first: u.arbitrary()?,
                pages: u.arbitrary()?,
            },
        })
    }
}

/// Number of host pages a [`VmOp::Host`] names ([`host_pages`]).
pub const HOST_PAGES: usize = 48;

/// The host pages host operations touch: the first 32 pages of guest RAM
/// (tables and data) and the first 16 of memslot 1's host memory.
pub fn host_pages() -> [Hva; HOST_PAGES] {
    std::array::from_fn(|i| {
        let i = i as u64;
        if i < 32 {
            Hva::new(RAM_HVA + i * PAGE)
        } else {
            Hva::new(SLOT1_HVA + (i - 32) * PAGE)
        }
    })
}

/// A configuration drawn from a fuzzer's input: always a valid one, a
/// dirty ring possible (a runner on the shadow MMU drops it).
fn arbitrary_config(u: &mut Unstructured<'_>) -> arbitrary::Result<VmConfig> {
    let seed: u64 = u.arbitrary()?;
    Ok(vmmu_sim::config::from_seed(seed, Some(MmuKind::Tdp)).0)
}

/// The seed threads' policies drawn from a fuzzer's input: safe ones only
/// (an unsafe one is the experiments' and the checker's to catch, not a
/// fuzzer finding).
fn arbitrary_policies(u: &mut Unstructured<'_>) -> arbitrary::Result<vmmu::vm::Policies> {
    let seed: u64 = u.arbitrary()?;
    Ok(vmmu_sim::config::policies_from_seed(seed))
}

/// A whole-VM program: the MMU, the paging mode, the initial control
/// state and configuration, and up to [`MAX_OPS`] operations.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct VmProgram {
    /// The MMU.
    pub mmu: MmuChoice,
    /// The paging mode.
    pub mode: VmMode,
    /// CR4.PCIDE (IA-32e paging only).
    pub pcide: bool,
    /// CR4.PGE at start.
    pub pge: bool,
    /// CR0.WP at start.
    pub wp: bool,
    /// CR4.SMEP at start.
    pub smep: bool,
    /// CR4.SMAP at start.
    pub smap: bool,
    /// EFER.NXE at start.
    pub nxe: bool,
    /// CR4.PKE at start (IA-32e paging only).
    pub pke: bool,
    /// The VM's configuration: every MMU and memslot knob (the TDP ones
    /// ignored by the shadow MMU, which has no dirty ring).
    #[arbitrary(with = arbitrary_config)]
    pub config: VmConfig,
    /// The seed threads' policies ([`vmmu::vm::Policies`]).
    #[arbitrary(with = arbitrary_policies)]
    pub policies: vmmu::vm::Policies,
    /// Memslot 1 exists at start (at the first placement).
    pub slot1: bool,
    /// Memslot 0 logs dirty pages from the start.
    pub log0: bool,
    /// The operations.
    pub ops: VmOps,
}

/// The operations of a program: ops are taken while input remains, up to
/// [`MAX_OPS`] (`arbitrary`'s own `Vec` stops at the first odd "continue"
/// byte, which makes most random programs one or two ops long).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmOps(pub Vec<VmOp>);

impl<'a> Arbitrary<'a> for VmOps {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < MAX_OPS {
            ops.push(VmOp::arbitrary(u)?);
        }
        Ok(VmOps(ops))
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Self::arbitrary(&mut u)
    }
}

/// What a run did (for the drivers' coverage checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmSummary {
    /// Ops run.
    pub ops: usize,
    /// Accesses (and table stores) that completed to memory.
    pub done: usize,
    /// Accesses that completed as MMIO.
    pub mmio: usize,
    /// Accesses that raised #PF.
    pub page_faults: usize,
    /// Accesses that raised #GP.
    pub general_protection: usize,
    /// Results allowed only as a stale translation.
    pub stale: usize,
    /// Harvested pages checked against the writes logged.
    pub dirty_checked: usize,
    /// Memslot changes that succeeded.
    pub slot_changes: usize,
    /// Host operations that succeeded.
    pub host_changes: usize,
}

// ---- the checker's memory model ---------------------------------------------

type Frame = [u64; 512];

/// Guest memory as the guest's walks see it at one moment: the frames of
/// [`FRAMES`] (a gpa without a memslot reads as zeros, as the MMUs read
/// it), everything else zero.
#[derive(Clone, PartialEq, Eq)]
struct Snapshot(Vec<Rc<Frame>>);

/// The snapshotted frames, sorted.
fn universe() -> Vec<u64> {
    let mut u: Vec<u64> = FRAMES.to_vec();
    u.sort_unstable();
    u.dedup();
    u
}

struct SnapMem<'a> {
    snap: &'a Snapshot,
    universe: &'a [u64],
    entry: u64,
}

impl PtMemory for SnapMem<'_> {
    type Error = ();
    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, ()> {
        debug_assert_eq!(size.bytes(), self.entry);
        let frame = gpa.raw() & !0xfff;
        let Ok(i) = self.universe.binary_search(&frame) else {
            return Ok(0);
        };
        let q = self.snap.0[i][((gpa.raw() & 0xfff) / 8) as usize];
        Ok(if size == EntrySize::Four {
            (q >> (8 * (gpa.raw() & 4))) & 0xffff_ffff
        } else {
            q
        })
    }
    fn cmpxchg_entry(&self, _: Gpa, _: EntrySize, _: u64, _: u64) -> Result<Result<(), u64>, ()> {
        unreachable!("peek never writes")
    }
}

/// What an access ended in, as the checker compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Fault(u32),
    Gp,
    Gpa(u64),
}

/// One translation a TLB may hold for a page: made from `state` through
/// the root in `cr3`, tagged `pcid`.
#[derive(Clone)]
struct Cand {
    state: Rc<Snapshot>,
    cr3: u64,
    pcid: u16,
}

/// The VM under test.
struct Model {
    mode: VmMode,
    features: CpuFeatures,
    pcide: bool,
    wp: bool,
    smep: bool,
    smap: bool,
    pge: bool,
    nxe: bool,
    /// CR4.PKE (applies in IA-32e paging).
    pke: bool,
    /// PKRU.
    pkru: u32,
    cr3: u64,
    pages: [u64; N_PAGES],
    /// A stale translation cached under any PCID is accepted (see [`run`]).
    any_pcid: bool,
    universe: Vec<u64>,
    /// Per page: the translations a TLB may hold since its last flush.
    cached: Vec<Vec<Cand>>,
    /// The last value written to each quadword, by host address.
    data: HashMap<u64, u64>,
    /// The last content seen of each host page of the universe (for pages
    /// the host has swapped out).
    host_cache: HashMap<u64, Rc<Frame>>,
    zero: Rc<Frame>,
    /// Writes completed in logging memslots: (slot, page in the slot).
    logged: BTreeSet<(u16, u64)>,
    /// Memslot 1: its placement (None if absent), read-only, logging.
    slot1: Option<u64>,
    slot1_ro: bool,
    slot1_log: bool,
    slot0_log: bool,
}

impl Model {
    fn regs(&self) -> ControlRegs {
        let mut cr0 = Cr0::PE | Cr0::PG;
        cr0.set(Cr0::WP, self.wp);
        let (mut cr4, mut efer) = match self.mode {
            VmMode::Level4 => (Cr4::PAE, Efer::LME | Efer::LMA),
            VmMode::Level5 => (Cr4::PAE | Cr4::LA57, Efer::LME | Efer::LMA),
            VmMode::Bits32 => (Cr4::PSE, Efer::empty()),
        };
        cr4.set(Cr4::PGE, self.pge);
        cr4.set(Cr4::PKE, self.pke && self.mode.long());
        cr4.set(Cr4::SMEP, self.smep);
        cr4.set(Cr4::SMAP, self.smap);
        cr4.set(Cr4::PCIDE, self.pcide);
        efer.set(Efer::NXE, self.nxe);
        ControlRegs { cr0, cr4, efer }
    }

    fn pcid(&self) -> u16 {
        if self.pcide { (self.cr3 & 0xfff) as u16 } else { 0 }
    }

    /// The linear page of `va` (32 bits wide in 32-bit paging).
    fn lin_page(&self, va: u64) -> u64 {
        let va = if self.mode.long() { va } else { va & 0xffff_ffff };
        va >> 12
    }

    fn reference(&self, state: &Snapshot, cr3: u64, va: u64, access: Access) -> Seen {
        let paging = GuestPaging::new(&self.regs(), &self.features);
        let mem = SnapMem {
            snap: state,
            universe: &self.universe,
            entry: self.mode.entry(),
        };
        match paging.peek(&mem, &paging.root(cr3, [0; 4]), Gva::new(va), access, self.pkru) {
            Ok(w) => Seen::Gpa(w.gpa.raw()),
            Err(WalkError::PageFault(pf)) => Seen::Fault(pf.error_code.bits()),
            Err(WalkError::NonCanonical) => Seen::Gp,
            Err(WalkError::Memory { .. }) => unreachable!("snapshots always read"),
        }
    }

    /// Whether the translation `c` holds for `va` is global (CR4.PGE and
    /// the leaf's G bit): it survives non-global flushes and serves every
    /// PCID.
    fn global(&self, c: &Cand, va: u64) -> bool {
        if !self.pge {
            return false;
        }
        let paging = GuestPaging::new(&self.regs(), &self.features);
        let mem = SnapMem {
            snap: &c.state,
            universe: &self.universe,
            entry: self.mode.entry(),
        };
        // A supervisor read with AC: only a structural fault fails it.
        let access = Access::new(AccessKind::Read, 0, true);
        paging
            .peek(&mem, &paging.root(c.cr3, [0; 4]), Gva::new(va), access, 0)
            .is_ok_and(|w| w.leaf().is_some_and(|l| l.pte & PT_GLOBAL != 0))
    }

    /// Drops the candidates `drop(candidate, is_global)` selects, on the
    /// pages `on(page)` selects.
    fn flush(&mut self, on: impl Fn(u64) -> bool, drop: impl Fn(&Cand, bool) -> bool) {
        let mut cached = std::mem::take(&mut self.cached);
        for (i, list) in cached.iter_mut().enumerate() {
            let va = self.pages[i];
            if on(self.lin_page(va)) {
                list.retain(|c| !drop(c, self.global(c, va)));
            }
        }
        self.cached = cached;
    }

    fn flush_all(&mut self) {
        self.cached.iter_mut().for_each(Vec::clear);
    }
}

/// A quadword of memory as the model allows it: `now` holds every bit of
/// the last value written and nothing more but Accessed/Dirty flags the
/// walkers may have set (bits 5 and 6 of either 4-byte half).
fn data_ok(now: u64, written: u64) -> bool {
    const AD: u64 = 0x60 | 0x60 << 32;
    written & !now == 0 && now & !(written | AD) == 0
}

/// Runs `program` with the checker on; panics at the first violation.
///
/// One known deviation of the shadow MMU is allowed here (not by
/// [`run_strict`]): its shadow pages are shared by the roots of every PCID
/// (as KVM's are: the role has no PCID), so an unsync page's stale SPTE,
/// made while one PCID was current, shows through another PCID's cached
/// root after a MOV to CR3 with the no-flush bit, although that PCID's
/// translations were flushed before the guest's edit. x86 allows a stale
/// translation only in the PCID that cached it; here, under the shadow
/// MMU, a translation cached under any PCID since the page's last flush
/// is accepted.
pub fn run(program: &VmProgram) -> VmSummary {
    Runner::new(program, false).run(program)
}

/// [`run`] without the allowance for shared unsync pages across PCIDs.
pub fn run_strict(program: &VmProgram) -> VmSummary {
    Runner::new(program, true).run(program)
}

struct Runner {
    mmu: Mmu,
    host: Arc<HostAddressSpace>,
    slots: Arc<MemslotTable>,
    mem: GuestMemory,
    vcpu: Vcpu,
    m: Model,
    default_max_pages: u64,
    config: VmConfig,
    /// The VMM's cursor in the vCPU's dirty ring.
    ring_fetch: u32,
    summary: VmSummary,
    name: &'static str,
}

fn region(id: u16, gpa: u64, size: u64, hva: u64, flags: MemslotFlags) -> MemoryRegion {
    MemoryRegion {
        as_id: 0,
        id,
        flags,
        guest_phys_addr: Gpa::new(gpa),
        memory_size: size,
        userspace_addr: Hva::new(hva),
    }
}

impl Runner {
    fn new(p: &VmProgram, strict: bool) -> Runner {
        let vma = VmaFlags::WRITE | VmaFlags::THP;
        let mut config = p.config;
        if p.mmu == MmuChoice::Shadow {
            // The shadow MMU logs into the bitmap only.
            config.dirty_ring = 0;
        }
        // The recovery worker would run at times of its own: the program
        // runs recovery itself (`VmOp::NxRecover`).
        config.nx_recovery_ratio = 0;
        let kind = match p.mmu {
            MmuChoice::Tdp => MmuKind::Tdp,
            MmuChoice::Shadow => MmuKind::Shadow,
        };
        let vm = VmBuilder::new(RAM)
            .hva(Hva::new(RAM_HVA))
            .flags(vma)
            .reserve(2 * (RAM + SLOT1_SIZE) + (64 << 20))
            .build(kind, config)
            .expect("the fuzz VM");
        vm.set_policies(p.policies);
        let (host, slots, mmu) = (vm.host.clone(), vm.slots.clone(), vm.mmu().clone());
        host.mmap(Hva::new(SLOT1_HVA), SLOT1_SIZE, vma)
            .expect("mmap of memslot 1");
        // Logging starts after the VMM has written the guest's tables
        // (`Runner::new`), so that the first harvest is not everything.
        if p.slot1 {
            slots
                .create(region(1, SLOT1_AT[0], SLOT1_SIZE, SLOT1_HVA, MemslotFlags::empty()))
                .expect("memslot 1");
        }
        let features = CpuFeatures::default();
        let vcpu = mmu.vcpu(&slots, features, 1).expect("a vCPU");
        let name = match kind {
            MmuKind::Tdp => "TDP",
            MmuKind::Shadow => "shadow",
        };
        let default_max_pages = match &mmu {
            Mmu::Shadow(s) => s.max_pages(),
            Mmu::Tdp(_) => 0,
        };
        let mode = p.mode;
        let m = Model {
            mode,
            features,
            pcide: p.pcide && mode.long(),
            wp: p.wp,
            smep: p.smep,
            smap: p.smap,
            pge: p.pge,
            nxe: p.nxe,
            pke: p.pke,
            pkru: 0,
            cr3: ROOT_A,
            pages: mode.pages(),
            any_pcid: !strict && p.mmu == MmuChoice::Shadow,
            universe: universe(),
            cached: vec![Vec::new(); N_PAGES],
            data: HashMap::new(),
            host_cache: HashMap::new(),
            zero: Rc::new([0; 512]),
            logged: BTreeSet::new(),
            slot1: p.slot1.then_some(SLOT1_AT[0]),
            slot1_ro: false,
            slot1_log: false,
            slot0_log: false,
        };
        let mem = GuestMemory::new(host.clone(), slots.clone());
        let mut r = Runner {
            mmu,
            host,
            slots,
            mem,
            vcpu,
            m,
            default_max_pages,
            config,
            ring_fetch: 0,
            summary: VmSummary::default(),
            name,
        };
        r.build();
        if p.log0 {
            r.slots
                .update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES)
                .expect("dirty logging on memslot 0");
            r.m.slot0_log = true;
        }
        let regs = r.m.regs();
        r.vcpu
            .set_state(regs, ROOT_A, 0)
            .unwrap_or_else(|e| panic!("{} MMU: loading the initial state: {e}", r.name));
        r
    }

    /// The VMM writes a value of the guest's entry size, and the model
    /// records it.
    fn vmm_write(&mut self, gpa: u64, value: u64) {
        let size = self.m.mode.entry() as usize;
        self.mem
            .write_value(Gpa::new(gpa), size, value)
            .expect("the VMM's write to guest RAM");
        self.record_write(Hva::new(RAM_HVA + gpa), size, value);
    }

    fn record_write(&mut self, hva: Hva, size: usize, value: u64) {
        let q = hva.raw() & !7;
        let shift = 8 * (hva.raw() & 7);
        let mask = if size == 8 {
            u64::MAX
        } else {
            ((1u64 << (8 * size)) - 1) << shift
        };
        let old = self.m.data.get(&q).copied().unwrap_or(0);
        self.m.data.insert(q, (old & !mask) | ((value << shift) & mask));
    }

    /// The guest's initial tables and data (written by the VMM before the
    /// guest runs).
    fn build(&mut self) {
        let mode = self.m.mode;
        let e = mode.entry();
        let top = mode.entries() - 1;
        let mut writes: Vec<(u64, u64)> = Vec::new();
        let mut w = |table: u64, index: u64, value: u64| writes.push((table + e * index, value));
        let t = 0x7; // present, writable, user
        match mode {
            VmMode::Level4 | VmMode::Level5 => {
                let next = if mode == VmMode::Level5 {
                    w(L4, 0, PDPT | t);
                    w(L4, top, PDPT | t);
                    L4
                } else {
                    PDPT
                };
                w(ROOT_A, 0, next | t);
                w(ROOT_A, top, next | t);
                w(ROOT_B, 0, next | t);
                w(ROOT_B, 1, next | t);
                w(PDPT, 0, PD | t);
                w(PDPT, 1, PD | t);
                w(PD, 0, PT | t);
                w(PD, 1, PT_SELF | 0x3);
            }
            VmMode::Bits32 => {
                for root in [ROOT_A, ROOT_B] {
                    w(root, 0, PT | t);
                    w(root, 1, PT_SELF | 0x3);
                }
                w(ROOT_A, top, PT | t);
                w(ROOT_B, 768, PT2 | t);
            }
        }
        for i in 0..DATA_PAGES {
            w(PT, i, (DATA + i * PAGE) | t);
            w(PT2, i, (DATA + (DATA_PAGES - 1 - i) * PAGE) | 0x5);
        }
        for f in 0..SELF_FRAMES {
            w(PT_SELF, f, (f * PAGE) | 0x3);
        }
        for (gpa, value) in writes {
            self.vmm_write(gpa, value);
        }
        // Data frames i and i + 4 start equal (KSM can merge them).
        for i in 0..DATA_PAGES {
            for k in 0..512u64 {
                let gpa = DATA + i * PAGE + 8 * k;
                let v = ((i % 4 + 1) << 40) | k;
                self.mem
                    .write_u64(Gpa::new(gpa), v)
                    .expect("the VMM's write to guest RAM");
                self.record_write(Hva::new(RAM_HVA + gpa), 8, v);
            }
        }
    }

    /// Guest memory now, as the walks see it.
    fn snapshot(&mut self) -> Snapshot {
        let slots = self.slots.load(0);
        let mut frames = Vec::with_capacity(self.m.universe.len());
        for &gpa in &self.m.universe {
            let Some(slot) = slots.lookup(Gfn::new(gpa >> 12)).filter(|s| !s.is_invalid()) else {
                frames.push(self.m.zero.clone());
                continue;
            };
            let hva = slot.gpa_to_hva(Gpa::new(gpa)).expect("in the slot").raw();
            let mut buf = [0u8; 4096];
            let frame = match self.mem.read_atomic(Gpa::new(gpa), &mut buf) {
                Ok(()) => {
                    let mut f = [0u64; 512];
                    for (q, b) in f.iter_mut().zip(buf.chunks_exact(8)) {
                        *q = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                    }
                    match self.m.host_cache.get(&hva) {
                        Some(old) if **old == f => old.clone(),
                        _ => {
                            let f = Rc::new(f);
                            self.m.host_cache.insert(hva, f.clone());
                            f
                        }
                    }
                }
                // Swapped out: the content it had (never resident: zeros).
                Err(_) => self
                    .m
                    .host_cache
                    .get(&hva)
                    .cloned()
                    .unwrap_or_else(|| self.m.zero.clone()),
            };
            frames.push(frame);
        }
        Snapshot(frames)
    }

    fn run(mut self, p: &VmProgram) -> VmSummary {
        for (step, op) in p.ops.0.iter().take(MAX_OPS).enumerate() {
            self.step(step, op);
            self.summary.ops += 1;
        }
        self.summary
    }

    fn fail(&self, step: usize, op: &VmOp, what: std::fmt::Arguments<'_>) -> ! {
        panic!("{} MMU, {:?} paging, op {step} {op:?}: {what}", self.name, self.m.mode)
    }

    fn step(&mut self, step: usize, op: &VmOp) {
        // The state before this op could be cached by every page, through
        // the current root and PCID.
        let state = Rc::new(self.snapshot());
        let (cr3, pcid) = (self.m.cr3, self.m.pcid());
        for list in &mut self.m.cached {
            if list
                .last()
                .is_none_or(|c| c.cr3 != cr3 || c.pcid != pcid || *c.state != *state)
            {
                list.push(Cand {
                    state: state.clone(),
                    cr3,
                    pcid,
                });
            }
        }
        match *op {
            VmOp::WriteEntry { table, index, value } => {
                let mode = self.m.mode;
                let table = TABLES[table as usize % TABLES.len()];
                let offset = table + mode.entry() * mode.index(index);
                let page = 8 + TABLES.iter().position(|&t| t == table).expect("a table");
                let value = if mode.long() { value } else { value & 0xffff_ffff };
                let va = mode.self_va() + offset;
                debug_assert_eq!(va & !0xfff, self.m.pages[page]);
                self.access(
                    step,
                    op,
                    &state,
                    page,
                    va & 0xfff,
                    Kind::Write,
                    false,
                    false,
                    mode.entry() as u8,
                    value,
                );
            }
            VmOp::Access {
                page,
                offset,
                size,
                kind,
                user,
                ac,
                value,
            } => {
                let page = page as usize % N_PAGES;
                self.access(
                    step,
                    op,
                    &state,
                    page,
                    u64::from(offset) & 0xfff,
                    kind,
                    user,
                    ac,
                    size,
                    value,
                );
            }
            VmOp::MovCr3 { root_b, pcid, noflush } => {
                let root = if root_b { ROOT_B } else { ROOT_A };
                let (pcid, noflush) = if self.m.pcide {
                    (pcid & 0xfff, noflush)
                } else {
                    (0, false)
                };
                let value = root | u64::from(pcid) | if noflush { 1 << 63 } else { 0 };
                if let Err(e) = self.vcpu.mov_cr3(value) {
                    self.fail(step, op, format_args!("MOV to CR3 failed: {e}"));
                }
                self.m.cr3 = root | u64::from(pcid);
                if !noflush {
                    self.m.flush(|_| true, |c, global| c.pcid == pcid && !global);
                }
            }
            VmOp::SetWp(on) => {
                self.m.wp = on;
                self.vcpu.set_cr0_wp(on);
            }
            VmOp::SetSmep(on) => {
                self.m.smep = on;
                self.vcpu.set_cr4_bits(Some(on), None, None);
            }
            VmOp::SetSmap(on) => {
                self.m.smap = on;
                self.vcpu.set_cr4_bits(None, Some(on), None);
            }
            VmOp::SetPge(on) => {
                if on != self.m.pge {
                    self.m.flush_all();
                }
                self.m.pge = on;
                self.vcpu.set_cr4_bits(None, None, Some(on));
            }
            VmOp::SetNxe(on) => {
                self.m.nxe = on;
                self.m.flush_all();
                let regs = self.m.regs();
                if let Err(e) = self.vcpu.set_state(regs, self.m.cr3, self.m.pkru) {
                    self.fail(step, op, format_args!("reloading the state failed: {e}"));
                }
            }
            VmOp::Invlpg { page } => {
                let va = self.m.pages[page as usize % N_PAGES];
                self.vcpu.invlpg(Gva::new(va));
                let (lp, cur) = (self.m.lin_page(va), self.m.pcid());
                self.m.flush(|p| p == lp, |c, global| c.pcid == cur || global);
            }
            VmOp::Invpcid { kind, pcid, page } => {
                let va = self.m.pages[page as usize % N_PAGES];
                self.vcpu.invpcid(kind, pcid, Gva::new(va));
                let lp = self.m.lin_page(va);
                match kind {
                    0 => self.m.flush(|p| p == lp, |c, global| c.pcid == pcid && !global),
                    1 => self.m.flush(|_| true, |c, global| c.pcid == pcid && !global),
                    2 => self.m.flush_all(),
                    _ => self.m.flush(|_| true, |_, global| !global),
                }
            }
            VmOp::Host { op: hop, page, other } => self.host_op(hop, page, other),
            VmOp::Slot(s) => self.slot_op(s),
            VmOp::GetDirtyLog { slot } => self.harvest(step, op, slot),
            VmOp::ClearDirtyLog { slot, mask } => {
                let got = self.mmu.clear_dirty_log(0, slot, 0, &[mask]);
                if got.is_ok() {
                    self.m
                        .logged
                        .retain(|&(s, p)| s != slot || p >= 64 || mask >> p & 1 == 0);
                }
            }
            VmOp::ZapAll => self.mmu.zap_all(),
            VmOp::MmuPages { small } => {
                self.mmu.set_max_pages(if small { 0 } else { self.default_max_pages });
            }
            VmOp::Wrpkru(pkru) => {
                self.m.pkru = pkru;
                self.vcpu.set_pkru(pkru);
            }
            VmOp::SetPke(on) => {
                self.m.pke = on;
                self.m.flush_all();
                let regs = self.m.regs();
                if let Err(e) = self.vcpu.set_state(regs, self.m.cr3, self.m.pkru) {
                    self.fail(step, op, format_args!("reloading the state failed: {e}"));
                }
            }
            VmOp::NxRecover => {
                if let Mmu::Tdp(m) = &self.mmu {
                    m.recover_nx_huge_pages(self.config.nx_recovery_ratio.max(1));
                }
            }
            VmOp::PreFault { first, pages } => {
                if let (Mmu::Tdp(m), Some(root)) = (&self.mmu, self.vcpu.root()) {
                    let mut caches = m.vcpu_caches();
                    let start = Gpa::new(u64::from(first) << 14);
                    match m.pre_fault_memory(root, start, (u64::from(pages) + 1) << 12, &mut caches) {
                        Ok(r) if r.stopped.is_none() || r.stopped.is_some_and(|(gpa, _)| gpa >= start) => {}
                        Ok(r) => self.fail(step, op, format_args!("pre-fault stopped before its start: {r:?}")),
                        // A host that cannot give the first page (a
                        // read-only or unmapped range the program made).
                        Err(vmmu::mmu::tdp::TdpError::Host { .. }) => {}
                        Err(e) => self.fail(step, op, format_args!("pre-fault failed: {e}")),
                    }
                }
            }
        }
        let violations = self.mmu.audit();
        if !violations.is_empty() {
            self.fail(step, op, format_args!("the MMU's audit: {violations:?}"));
        }
        let stats = self.vcpu.stats();
        if stats.freed_frame_accesses != 0 || stats.invalid_root_uses != 0 {
            self.fail(
                step,
                op,
                format_args!(
                    "isolation: {} accesses to freed frames, {} uses of invalidated roots (expected 0)",
                    stats.freed_frame_accesses, stats.invalid_root_uses
                ),
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn access(
        &mut self,
        step: usize,
        op: &VmOp,
        state: &Snapshot,
        page: usize,
        offset: u64,
        kind: Kind,
        user: bool,
        ac: bool,
        size: u8,
        value: u64,
    ) {
        let va = self.m.pages[page] + offset;
        let cpl = if user { 3 } else { 0 };
        let access = Access::new(kind.access_kind(), cpl, ac);
        let fresh = self.m.reference(state, self.m.cr3, va, access);
        let mut result = self.vcpu.access(
            Gva::new(va),
            Access::new(kind.access_kind(), cpl, ac),
            usize::from(size),
            value,
        );
        if matches!(result, Ok(AccessResult::DirtyRingFull)) && self.config.dirty_ring != 0 {
            // KVM_EXIT_DIRTY_RING_FULL: the VMM reaps, the vCPU runs again.
            self.reap_ring(step, op);
            result = self.vcpu.access(
                Gva::new(va),
                Access::new(kind.access_kind(), cpl, ac),
                usize::from(size),
                value,
            );
        }
        let result = match result {
            Ok(r) => r,
            Err(e) => self.fail(step, op, format_args!("the access to {va:#x} failed: {e}")),
        };
        let got = match result {
            AccessResult::Done { gpa, .. } => Seen::Gpa(gpa.raw()),
            AccessResult::Fault(GuestFault::PageFault { error_code, .. }) => Seen::Fault(error_code.bits()),
            AccessResult::Fault(GuestFault::GeneralProtection) => Seen::Gp,
            AccessResult::DirtyRingFull => self.fail(step, op, format_args!("a dirty-ring exit without a dirty ring")),
            AccessResult::VmExit(e) => self.fail(
                step,
                op,
                format_args!("an exit to an L1 hypervisor, where there is none: {e:?}"),
            ),
        };
        if got != fresh {
            let cur = self.m.pcid();
            let stale_ok = self.m.cached[page].iter().any(|c| {
                (c.pcid == cur || self.m.any_pcid || self.m.global(c, va))
                    && matches!(self.m.reference(&c.state, c.cr3, va, access), s @ Seen::Gpa(_) if s == got)
            });
            if !stale_ok {
                self.fail(
                    step,
                    op,
                    format_args!(
                        "access to {va:#x} ({kind:?}, CPL {cpl}, AC {ac}, CR3 {:#x}): expected {fresh:x?} \
                         (the walker on guest memory now), got {got:x?}, which no translation cached since \
                         the page's last flush gives ({} candidates)",
                        self.m.cr3,
                        self.m.cached[page].len()
                    ),
                );
            }
            self.summary.stale += 1;
        }
        match result {
            AccessResult::Done { gpa, value: read, mmio } => {
                self.check_data(step, op, gpa, kind, size, value, read, mmio);
            }
            AccessResult::Fault(GuestFault::PageFault { .. }) => {
                self.summary.page_faults += 1;
                if got == fresh {
                    // A #PF invalidates the page's translations of the
                    // current PCID (SDM 4.10.4.1).
                    let (lp, cur) = (self.m.lin_page(va), self.m.pcid());
                    self.m.flush(|p| p == lp, |c, global| c.pcid == cur && !global);
                }
            }
            _ => self.summary.general_protection += 1,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_data(
        &mut self,
        step: usize,
        op: &VmOp,
        gpa: Gpa,
        kind: Kind,
        size: u8,
        value: u64,
        read: u64,
        mmio: bool,
    ) {
        let write = kind == Kind::Write;
        let slots = self.slots.load(0);
        let slot = slots.lookup(gpa.frame()).filter(|s| !s.is_invalid()).cloned();
        drop(slots);
        let Some(slot) = slot.filter(|s| !(write && s.is_readonly())) else {
            if !mmio || (!write && read != 0) {
                self.fail(
                    step,
                    op,
                    format_args!(
                        "gpa {gpa:#x} has no writable memslot: expected an MMIO exit reading 0, got mmio {mmio} \
                         value {read:#x}"
                    ),
                );
            }
            self.summary.mmio += 1;
            return;
        };
        if mmio {
            self.fail(
                step,
                op,
                format_args!("gpa {gpa:#x} is in memslot {}: got an MMIO exit", slot.id()),
            );
        }
        self.summary.done += 1;
        let size = usize::from(size);
        let hva = slot.gpa_to_hva(gpa).expect("in the slot");
        if write {
            self.record_write(hva, size, value);
            if slot.logs_dirty_pages() {
                self.m
                    .logged
                    .insert((slot.id(), gpa.frame().raw() - slot.base_gfn().raw()));
            }
        } else {
            let vmm = self
                .mem
                .read_value(gpa, size)
                .unwrap_or_else(|e| self.fail(step, op, format_args!("the VMM cannot read gpa {gpa:#x}: {e}")));
            if vmm != read {
                self.fail(
                    step,
                    op,
                    format_args!("read of gpa {gpa:#x}: expected {vmm:#x} (what the VMM sees there), got {read:#x}"),
                );
            }
        }
        let q = Gpa::new(gpa.raw() & !7);
        let now = self
            .mem
            .read_u64(q)
            .unwrap_or_else(|e| self.fail(step, op, format_args!("the VMM cannot read gpa {q:#x}: {e}")));
        let written = self.m.data.get(&(hva.raw() & !7)).copied().unwrap_or(0);
        if !data_ok(now, written) {
            self.fail(
                step,
                op,
                format_args!(
                    "guest memory at gpa {q:#x} (hva {:#x}): expected {written:#x} (the last value written, \
                     A/D aside), got {now:#x}",
                    hva.raw() & !7
                ),
            );
        }
    }

    /// A harvest of memslot `slot`'s dirty pages by the configured
    /// protocol (`KVM_GET_DIRTY_LOG`, or the dirty ring of every slot),
    /// checked: every page written while the slot logged is reported.
    fn harvest(&mut self, step: usize, op: &VmOp, slot: u16) {
        let logging = if slot == 0 {
            self.m.slot0_log
        } else {
            self.m.slot1.is_some() && self.m.slot1_log
        };
        if self.config.dirty_ring != 0 {
            self.reap_ring(step, op);
            return;
        }
        let got = self.mmu.get_dirty_log(0, slot);
        match got {
            Ok(bitmap) => {
                if !logging {
                    self.fail(step, op, format_args!("a harvest of a memslot that does not log"));
                }
                let reported: BTreeSet<u64> = vmmu::vm::bitmap_pages(&bitmap).into_iter().collect();
                self.check_harvest(step, op, slot, &reported);
                if !self.config.manual_protect {
                    self.m.logged.retain(|&(s, _)| s != slot);
                }
            }
            Err(e) if logging => self.fail(
                step,
                op,
                format_args!("KVM_GET_DIRTY_LOG of a logging memslot failed: {e}"),
            ),
            Err(_) => {}
        }
    }

    /// Collects the vCPU's dirty ring and resets it, checking every slot's
    /// logged writes against what the ring reported.
    fn reap_ring(&mut self, step: usize, op: &VmOp) {
        let (Mmu::Tdp(m), Some(ring)) = (&self.mmu, self.vcpu.dirty_ring()) else {
            self.fail(step, op, format_args!("a dirty ring harvest without a ring"))
        };
        let entries = ring.harvest(&mut self.ring_fetch);
        m.reset_dirty_rings([&**ring]);
        for slot in [0u16, 1] {
            let reported: BTreeSet<u64> = entries
                .iter()
                .filter(|e| e.slot == u32::from(slot))
                .map(|e| e.offset)
                .collect();
            self.check_harvest(step, op, slot, &reported);
            self.m.logged.retain(|&(s, _)| s != slot);
        }
    }

    /// Every page of `slot` written while it logged is in `reported`.
    fn check_harvest(&mut self, step: usize, op: &VmOp, slot: u16, reported: &BTreeSet<u64>) {
        let pages: Vec<u64> = self.m.logged.range((slot, 0)..(slot + 1, 0)).map(|&(_, p)| p).collect();
        for p in pages {
            if !reported.contains(&p) {
                self.fail(
                    step,
                    op,
                    format_args!(
                        "page {p:#x} of memslot {slot} was written while it logged dirty pages, and is not in \
                         the harvest (expected it, got {reported:x?})"
                    ),
                );
            }
            self.summary.dirty_checked += 1;
        }
    }

    fn host_op(&mut self, op: HostOp, page: u8, other: u8) {
        let pages = host_pages();
        let hva = pages[page as usize % HOST_PAGES];
        let huge = Hva::new(hva.raw() & !((2 << 20) - 1));
        let h = &self.host;
        let ok = match op {
            HostOp::Collapse => h.collapse_thp(huge).is_ok(),
            HostOp::Split => h.split_thp(huge).is_ok(),
            HostOp::Migrate => h.migrate(hva).is_ok(),
            HostOp::SwapOut => h.swap_out(hva).is_ok(),
            HostOp::SwapIn => h.swap_in(hva).is_ok(),
            HostOp::Ksm => h
                .ksm_merge(hva, pages[other as usize % HOST_PAGES])
                .is_ok_and(|merged| merged),
            HostOp::Mprotect => h.mprotect(hva, PAGE, false).is_ok() && h.mprotect(hva, PAGE, true).is_ok(),
            HostOp::Age => {
                h.clear_young(vmmu::host::HvaRange::new(hva, PAGE));
                true
            }
        };
        self.summary.host_changes += usize::from(ok);
    }

    fn slot_op(&mut self, op: SlotOp) {
        let flags = |ro: bool, log: bool| {
            let mut f = MemslotFlags::empty();
            f.set(MemslotFlags::READONLY, ro);
            f.set(MemslotFlags::LOG_DIRTY_PAGES, log);
            f
        };
        let s = &self.slots;
        let m = &mut self.m;
        let ok = match op {
            SlotOp::Create { at, readonly, log } => {
                let at = SLOT1_AT[at as usize % SLOT1_AT.len()];
                let r = m.slot1.is_none()
                    && s.create(region(1, at, SLOT1_SIZE, SLOT1_HVA, flags(readonly, log)))
                        .is_ok();
                if r {
                    (m.slot1, m.slot1_ro, m.slot1_log) = (Some(at), readonly, log);
                }
                r
            }
            SlotOp::Delete => {
                let r = s.delete(0, 1).is_ok();
                if r {
                    m.slot1 = None;
                    m.logged.retain(|&(s, _)| s != 1);
                }
                r
            }
            SlotOp::Move { at } => {
                let at = SLOT1_AT[at as usize % SLOT1_AT.len()];
                let r = m.slot1.is_some_and(|cur| cur != at) && s.move_slot(0, 1, Gpa::new(at)).is_ok();
                if r {
                    m.slot1 = Some(at);
                }
                r
            }
            SlotOp::Log { slot, on } => {
                let slot = u16::from(slot % 2);
                let (exists, ro) = if slot == 0 {
                    (true, false)
                } else {
                    (m.slot1.is_some(), m.slot1_ro)
                };
                let r = exists && s.update_flags(0, slot, flags(ro, on)).is_ok();
                if r {
                    let was = if slot == 0 { m.slot0_log } else { m.slot1_log };
                    if was && !on {
                        m.logged.retain(|&(s, _)| s != slot);
                    }
                    if slot == 0 {
                        m.slot0_log = on;
                    } else {
                        m.slot1_log = on;
                    }
                }
                r
            }
            SlotOp::ToggleReadonly => match m.slot1 {
                Some(at) => {
                    let deleted = s.delete(0, 1).is_ok();
                    m.logged.retain(|&(s, _)| s != 1);
                    let created = deleted
                        && s.create(region(1, at, SLOT1_SIZE, SLOT1_HVA, flags(!m.slot1_ro, m.slot1_log)))
                            .is_ok();
                    if created {
                        m.slot1_ro = !m.slot1_ro;
                    } else if deleted {
                        m.slot1 = None;
                    }
                    created
                }
                None => false,
            },
        };
        self.summary.slot_changes += usize::from(ok);
    }
}
