//! The L1 hypervisor model (`vmmu run --nested`): the VM's guest is a
//! hypervisor that runs 2 to 4 L2 VMs, each an instance of the guest OS
//! model, with nested paging: EPT12 on Intel, NPT12 on AMD.
//!
//! - **Memory.** L1 gives L2 VM `i` the L1-physical range
//!   `base(i)..base(i) + size`, mapped linearly by its nested tables (L2
//!   gpa `g` is L1 gpa `base(i) + g`), and keeps the tables themselves in
//!   a region of its own below the L2 ranges.
//! - **Lazily.** L1 starts each VM with an empty top table and maps on
//!   demand: an L2 access its tables do not translate exits to L1 (an EPT
//!   violation or a #NPF with the not-present code), and L1 writes the
//!   missing entries, with 4K leaves for even VMs and 2M leaves for odd
//!   ones (which the nested MMU shadows with direct pages), then resumes
//!   L2.
//! - **Through its vCPUs.** L1 reads and writes its tables as any guest
//!   writes memory: through an L1 vCPU on the TDP MMU (paging off). So its
//!   writes to tables the nested MMU shadows are trapped by the TDP MMU's
//!   write tracking and emulated, as KVM does for an L1 that edits EPT12.
//! - **Taking memory back.** Now and then L1 unmaps a range of a VM's
//!   memory (clears the leaves, as a hypervisor that reclaims or migrates
//!   L2 pages does) and invalidates it on every vCPU, as an IPI would have
//!   each run it before its next L2 operation: INVEPT single-context on
//!   Intel, a VMRUN flushing the ASID on AMD (its leaf tables are unsync
//!   in the nested MMU, so until then an L2 vCPU may still reach the old
//!   frame, as on hardware); the next L2 access there exits and L1 maps it
//!   again, to the same L1 frames, so L2's data stays.
//!
//! The run checks every L2 access against the L2 OS's record of its page
//! tables and a data oracle over L1's memory at `base(i) + gpa`: a
//! translation through a wrong or stale EPT02/NPT02 entry reads a value
//! the oracle did not write there.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::Vendor;
use vmmu::arch::ept::{EptViolationQual, Eptp};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::arch::pfec::PfErrorCode;
use vmmu::cpu::vcpu::{AccessResult, L1Invalidation, L1Nested, Vcpu, VcpuError};
use vmmu::mem::{GuestMemory, MemoryRegion, MemslotFlags, MemslotTable};
use vmmu::vm::{Machine, RAM_HVA};
use vmmu::walker::ControlRegs;
use vmmu::walker::nested::NestedFault;

/// Where L1 keeps its nested tables: L1-physical `TABLES..L2_START`.
const TABLES: u64 = 2 << 20;
/// Where the L2 VMs' memory starts in L1's.
const L2_START: u64 = 4 << 20;
/// The smallest memory an L2 VM gets (the guest OS model's minimum).
pub const MIN_L2_MEMORY: u64 = 16 << 20;
/// Exits L1 handles for one access before it gives up on it (each maps one
/// level's worth of missing entries; a correct MMU needs one or two).
pub const MAX_L1_EXITS: u32 = 64;

/// R | W | X (EPT) or P | R/W | U (NPT): the rights of every entry L1
/// writes.
const RWX: u64 = 0x7;
/// EPT leaf memory type: write-back.
const EPT_WB: u64 = 6 << 3;
/// The page-size bit of a 2M leaf (both formats).
const LARGE: u64 = 1 << 7;

/// One L2 VM as L1 keeps it.
#[derive(Debug)]
pub struct L2Vm {
    /// Where its memory is in L1's.
    pub base: u64,
    /// Its memory in bytes.
    pub size: u64,
    /// The L1-physical address of its nested tables' top table.
    pub root: u64,
    /// Whether L1 maps it with 2M leaves.
    pub huge: bool,
    /// L1's lock on its tables (L1's own `mmu_lock` for this VM).
    lock: Mutex<()>,
}

impl L2Vm {
    /// The address bits below a leaf of its tables (12, or 21 for 2M).
    fn leaf_shift(&self) -> u32 {
        if self.huge { 21 } else { 12 }
    }
}

/// What L1 did, counted.
#[derive(Debug, Default)]
pub struct L1Stats {
    /// Exits from L2 that L1 handled by mapping memory.
    pub exits: AtomicU64,
    /// Leaves L1 wrote.
    pub mapped: AtomicU64,
    /// Leaves L1 cleared when taking memory back.
    pub unmapped: AtomicU64,
    /// Switches of a vCPU from one L2 VM to another.
    pub switches: AtomicU64,
    /// Invalidations L1 made on its vCPUs (INVEPT, flushing VMRUNs).
    pub invalidations: AtomicU64,
}

/// The L1 hypervisor.
pub struct L1Hypervisor {
    vendor: Vendor,
    /// Its L2 VMs.
    pub vms: Vec<L2Vm>,
    /// L1's vCPUs, one per run vCPU (the L1 side of the same CPU).
    vcpus: Vec<Mutex<Vcpu>>,
    /// The next free frame of the table region.
    next_table: Mutex<u64>,
    /// Per run vCPU: the VMs (bit `i` for VM `i`) whose invalidation it
    /// has yet to run (L1's IPIs).
    pending: Vec<AtomicU64>,
    /// What it did.
    pub stats: L1Stats,
}

impl std::fmt::Debug for L1Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L1Hypervisor")
            .field("vendor", &self.vendor)
            .field("vms", &self.vms)
            .finish_non_exhaustive()
    }
}

/// Memory each of `vms` L2 VMs gets in an L1 of `memory` bytes (a
/// multiple of 2 MiB), `None` if it is less than [`MIN_L2_MEMORY`].
pub fn l2_memory(memory: u64, vms: usize) -> Option<u64> {
    let each = (memory.checked_sub(L2_START)? / vms as u64) & !((2 << 20) - 1);
    (each >= MIN_L2_MEMORY).then_some(each)
}

impl L1Hypervisor {
    /// L1 on machine `m` with `vcpus` vCPUs and `vms` L2 VMs sharing its
    /// memory; every VM's top table is allocated (empty).
    pub fn new(m: &Machine, vcpus: usize, vms: usize) -> Result<L1Hypervisor, String> {
        let size = l2_memory(m.ram(), vms).ok_or_else(|| {
            format!(
                "{} MiB of L1 memory leaves less than {} MiB to each of {vms} L2 VMs",
                m.ram() >> 20,
                MIN_L2_MEMORY >> 20
            )
        })?;
        let vendor = m.config().vendor;
        let mut l1 = Vec::new();
        for i in 0..vcpus {
            let v = m
                .vcpu(0x100 + i as u16, ControlRegs::default(), 0)
                .map_err(|e| e.to_string())?;
            l1.push(Mutex::new(v));
        }
        let mut hv = L1Hypervisor {
            vendor,
            vms: Vec::new(),
            vcpus: l1,
            next_table: Mutex::new(TABLES),
            pending: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            stats: L1Stats::default(),
        };
        for i in 0..vms {
            let root = hv.alloc_table()?;
            hv.vms.push(L2Vm {
                base: L2_START + i as u64 * size,
                size,
                root,
                huge: i % 2 == 1,
                lock: Mutex::new(()),
            });
        }
        Ok(hv)
    }

    /// The vendor.
    pub fn vendor(&self) -> Vendor {
        self.vendor
    }

    /// VM `vm`'s nested paging as L1 programs it at VM entry.
    pub fn l1_nested(&self, vm: usize) -> L1Nested {
        L1Nested::four_level(self.vendor, self.vms[vm].root)
    }

    /// VM `vm`'s physical memory as its VMM (L1) reaches it: a view of
    /// L1's memory at its base, on the host mapping that backs L1's.
    pub fn l2_memory(&self, m: &Machine, vm: usize) -> Result<GuestMemory, String> {
        let v = &self.vms[vm];
        let slots = Arc::new(MemslotTable::new(Default::default()));
        slots
            .create(MemoryRegion {
                as_id: 0,
                id: 0,
                flags: MemslotFlags::empty(),
                guest_phys_addr: Gpa::new(0),
                memory_size: v.size,
                userspace_addr: Hva::new(RAM_HVA + v.base),
            })
            .map_err(|e| e.to_string())?;
        Ok(GuestMemory::new(m.host.clone(), slots))
    }

    fn alloc_table(&self) -> Result<u64, String> {
        let mut next = self.next_table.lock();
        if *next >= L2_START {
            return Err("L1's table region is full".to_string());
        }
        let t = *next;
        *next += 4096;
        Ok(t)
    }

    /// Whether `exit` is one L1 answers by mapping memory: its tables have
    /// no translation for the address (not a protection fault: L1 never
    /// takes rights away, only whole entries).
    fn not_present(exit: &NestedFault) -> bool {
        match *exit {
            NestedFault::EptViolation { qual, .. } => {
                !qual.intersects(EptViolationQual::READABLE | EptViolationQual::WRITABLE | EptViolationQual::EXECUTABLE)
            }
            NestedFault::Npf { exitinfo1, .. } => exitinfo1 & u64::from(PfErrorCode::PRESENT.bits()) == 0,
            NestedFault::EptMisconfig { .. } => false,
        }
    }

    /// Handles `exit` of L2 VM `vm` on vCPU `vcpu`: maps the page (or 2M
    /// range) if the exit is for memory the VM has. `Ok(false)`: an exit
    /// L1 does not expect (outside the VM's memory, or a fault L1's own
    /// tables do not explain): the caller reports it.
    pub fn handle_exit(&self, vcpu: usize, vm: usize, exit: &NestedFault) -> Result<bool, VcpuError> {
        let v = &self.vms[vm];
        let gpa = exit.gpa().raw();
        if gpa >= v.size || !Self::not_present(exit) {
            return Ok(false);
        }
        self.stats.exits.fetch_add(1, Ordering::Relaxed);
        let mut cpu = self.vcpus[vcpu].lock();
        let _tables = v.lock.lock();
        let shift = v.leaf_shift();
        let at = self.leaf_entry(&mut cpu, v, gpa, true)?.ok_or(VcpuError::NoProgress {
            gva: Gva::new(gpa),
            last: Some(*exit),
        })?;
        if l1_read(&mut cpu, at)? & RWX == 0 {
            let frame = v.base + (gpa & !((1 << shift) - 1));
            let mut leaf = frame | RWX;
            if self.vendor == Vendor::Intel {
                leaf |= EPT_WB;
            }
            if v.huge {
                leaf |= LARGE;
            }
            l1_write(&mut cpu, at, leaf, 8)?;
            self.stats.mapped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// L1 takes back up to 16 leaves of VM `vm` from a random place (on
    /// vCPU `vcpu`): clears them and invalidates (INVEPT single-context;
    /// see the module documentation). Returns the leaves cleared.
    pub fn unmap(&self, vcpu: usize, vm: usize, seed: u64) -> Result<u64, VcpuError> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let v = &self.vms[vm];
        let mut cpu = self.vcpus[vcpu].lock();
        let _tables = v.lock.lock();
        let shift = v.leaf_shift();
        let leaves = v.size >> shift;
        let first = rng.random_range(0..leaves);
        let mut cleared = 0;
        for n in first..(first + rng.random_range(1..=16)).min(leaves) {
            let at = self.leaf_entry(&mut cpu, v, n << shift, false)?;
            if let Some(at) = at
                && l1_read(&mut cpu, at)? & RWX != 0
            {
                l1_write(&mut cpu, at, 0, 8)?;
                cleared += 1;
            }
        }
        self.stats.unmapped.fetch_add(cleared, Ordering::Relaxed);
        if cleared > 0 {
            for p in &self.pending {
                p.fetch_or(1 << vm, Ordering::AcqRel);
            }
        }
        Ok(cleared)
    }

    /// The L1-physical address of the leaf entry of VM `v`'s tables for
    /// `gpa`, walked with L1's vCPU `cpu` (L1's table lock held). A
    /// missing table is made (`create`; `None` when the table region is
    /// full) or ends the walk (`None`).
    fn leaf_entry(&self, cpu: &mut Vcpu, v: &L2Vm, gpa: u64, create: bool) -> Result<Option<u64>, VcpuError> {
        let leaf_level = if v.huge { 2 } else { 1 };
        let mut table = v.root;
        for level in (leaf_level + 1..=4u32).rev() {
            let at = table + 8 * ((gpa >> (12 + 9 * (level - 1))) & 511);
            let e = l1_read(cpu, at)?;
            if e & RWX != 0 {
                table = e & 0x000f_ffff_ffff_f000;
                continue;
            }
            if !create {
                return Ok(None);
            }
            let Ok(next) = self.alloc_table() else {
                return Ok(None);
            };
            l1_write(cpu, next, 0, 4096)?;
            l1_write(cpu, at, next | RWX, 8)?;
            table = next;
        }
        Ok(Some(table + 8 * ((gpa >> v.leaf_shift()) & 511)))
    }

    /// Runs on vCPU `vcpu` (whose L2 vCPU, now running VM `active`, is
    /// `l2`) the invalidations L1 asked of it since its last operation.
    pub fn run_pending(&self, vcpu: usize, active: usize, l2: &mut Vcpu) {
        let bits = self.pending[vcpu].swap(0, Ordering::AcqRel);
        for vm in (0..self.vms.len()).filter(|vm| bits >> vm & 1 != 0) {
            let what = match self.vendor {
                Vendor::Intel => L1Invalidation::InveptSingle(Eptp::new(self.vms[vm].root, 4, true)),
                // A VMRUN into another VM syncs anyway (KVM's
                // `nested_svm_transition_tlb_flush`).
                Vendor::Amd if vm == active => L1Invalidation::TlbControlFlush,
                Vendor::Amd => continue,
            };
            l2.l1_invalidate(what);
            self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An L1 read of 8 bytes at L1-physical `gpa`, retried while the host
/// refuses the page for a moment.
fn l1_read(cpu: &mut Vcpu, gpa: u64) -> Result<u64, VcpuError> {
    match l1_access(cpu, gpa, AccessKind::Read, 8, 0)? {
        AccessResult::Done { value, .. } => Ok(value),
        other => Err(unexpected(gpa, other)),
    }
}

/// An L1 write of `len` zero-or-`value` bytes at `gpa` (8, or 4096 to
/// zero a fresh table page).
fn l1_write(cpu: &mut Vcpu, gpa: u64, value: u64, len: u64) -> Result<(), VcpuError> {
    for off in (0..len).step_by(8) {
        match l1_access(cpu, gpa + off, AccessKind::Write, 8, value)? {
            AccessResult::Done { mmio: false, .. } => {}
            other => return Err(unexpected(gpa, other)),
        }
    }
    Ok(())
}

fn unexpected(gpa: u64, r: AccessResult) -> VcpuError {
    VcpuError::NoProgress {
        gva: Gva::new(gpa),
        last: match r {
            AccessResult::VmExit(f) => Some(f),
            _ => None,
        },
    }
}

fn l1_access(cpu: &mut Vcpu, gpa: u64, kind: AccessKind, size: usize, value: u64) -> Result<AccessResult, VcpuError> {
    for _ in 0..1_000_000 {
        match cpu.access(Gva::new(gpa), Access::new(kind, 0, false), size, value) {
            Err(e) if crate::guest::is_efault(&e) => std::thread::yield_now(),
            r => return r,
        }
    }
    cpu.access(Gva::new(gpa), Access::new(kind, 0, false), size, value)
}
