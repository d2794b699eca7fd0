//! The guest-memory API: gpa-level access as the VMM and the walker use it.
//!
//! Every access goes gpa → memslot → hva → host frame, faulting the host
//! page in if needed (and respecting a read-only mprotect and KSM copy on
//! write for writes), and marks written pages dirty in slots that log dirty
//! pages. Accesses may cross page and memslot boundaries; an access that
//! reaches an unmapped gpa or a read-only slot is refused before any byte is
//! copied.
//!
//! [`GuestMemory`] implements the walker's [`PtMemory`] (entries are read
//! and compare-exchanged atomically; a successful A/D update marks the
//! page-table page dirty) and rust-vmm's `Bytes<GuestAddress>`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::{
    AtomicAccess, Bytes, GuestAddress, GuestMemoryError as VmError, ReadVolatile, VolatileSlice, WriteVolatile,
};

use crate::addr::{Gpa, Hva, PAGE_SIZE};
use crate::host::mm::HostAddressSpace;
use crate::mem::error::GuestMemoryError;
use crate::mem::memslot::{Memslot, MemslotTable};
use crate::walker::{EntrySize, PtMemory};

/// Guest physical memory of one address space of a VM.
#[derive(Clone, Debug)]
pub struct GuestMemory {
    host: Arc<HostAddressSpace>,
    memslots: Arc<MemslotTable>,
    as_id: u16,
}

impl GuestMemory {
    /// Guest memory of address space 0 over `memslots` and `host`.
    pub fn new(host: Arc<HostAddressSpace>, memslots: Arc<MemslotTable>) -> Self {
        Self {
            host,
            memslots,
            as_id: 0,
        }
    }

    /// The same memory seen through address space `as_id` (1: SMM).
    ///
    /// # Panics
    /// If `as_id` is not 0 or 1.
    pub fn with_address_space(&self, as_id: u16) -> Self {
        assert!(as_id < crate::mem::memslot::ADDRESS_SPACE_NUM, "address space {as_id}");
        Self { as_id, ..self.clone() }
    }

    /// The host address space.
    pub fn host(&self) -> &Arc<HostAddressSpace> {
        &self.host
    }

    /// The memslots.
    pub fn memslots(&self) -> &Arc<MemslotTable> {
        &self.memslots
    }

    /// The address space accessed.
    pub fn as_id(&self) -> u16 {
        self.as_id
    }

    /// The hva of `gpa`, if a valid memslot maps it.
    pub fn gpa_to_hva(&self, gpa: Gpa) -> Option<Hva> {
        let slots = self.memslots.load(self.as_id);
        slots
            .lookup(gpa.frame())
            .filter(|s| !s.is_invalid())
            .and_then(|s| s.gpa_to_hva(gpa))
    }

    /// Marks the page of `gpa` dirty if its slot logs dirty pages (KVM's
    /// `mark_page_dirty`).
    pub fn mark_page_dirty(&self, gpa: Gpa) {
        if let Some(s) = self.memslots.load(self.as_id).lookup(gpa.frame()) {
            s.mark_page_dirty(gpa.frame());
        }
    }

    /// How many bytes from `gpa` (at most `len`) are mapped by valid slots
    /// (writable ones if `write`), and the error at the first byte that is
    /// not.
    fn mapped_prefix(&self, gpa: Gpa, len: usize, write: bool) -> (usize, Option<GuestMemoryError>) {
        let Some(end) = gpa.raw().checked_add(len as u64) else {
            return (0, Some(GuestMemoryError::Overflow { gpa, len }));
        };
        let slots = self.memslots.load(self.as_id);
        let mut at = gpa.raw();
        while at < end {
            let here = Gpa::new(at);
            match slots.lookup(here.frame()).filter(|s| !s.is_invalid()) {
                None => {
                    return (
                        (at - gpa.raw()) as usize,
                        Some(GuestMemoryError::GpaNotMapped { gpa: here }),
                    );
                }
                Some(s) if write && s.is_readonly() => {
                    return (
                        (at - gpa.raw()) as usize,
                        Some(GuestMemoryError::ReadOnlyMemslot {
                            gpa: here,
                            slot_id: s.id(),
                        }),
                    );
                }
                Some(s) => at = s.end_gfn().addr().raw().min(end),
            }
        }
        (len, None)
    }

    /// Runs `f(slot, hva, done, n)` for each piece of `[gpa, gpa + len)`
    /// that lies within one page, after checking the whole range is mapped
    /// (writably if `write`); marks each piece's page dirty if `mark_dirty`.
    fn for_each_page(
        &self,
        gpa: Gpa,
        len: usize,
        write: bool,
        mark_dirty: bool,
        mut f: impl FnMut(&Memslot, Hva, usize, usize) -> Result<(), GuestMemoryError>,
    ) -> Result<(), GuestMemoryError> {
        if let (_, Some(e)) = self.mapped_prefix(gpa, len, write) {
            return Err(e);
        }
        let slots = self.memslots.load(self.as_id);
        let mut done = 0;
        while done < len {
            let at = gpa.add(done as u64);
            let n = (PAGE_SIZE as usize - at.page_offset() as usize).min(len - done);
            // A concurrent memslot update may have removed the slot since
            // the check: report it rather than assume.
            let slot = slots
                .lookup(at.frame())
                .filter(|s| !s.is_invalid())
                .ok_or(GuestMemoryError::GpaNotMapped { gpa: at })?;
            let hva = slot.gpa_to_hva(at).ok_or(GuestMemoryError::GpaNotMapped { gpa: at })?;
            f(slot, hva, done, n)?;
            if mark_dirty {
                slot.mark_page_dirty(at.frame());
            }
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `gpa`.
    pub fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.for_each_page(gpa, buf.len(), false, false, |_, hva, done, n| {
            let off = hva.page_offset() as usize;
            self.host
                .with_frame(hva, false, |a, pfn| a.read(pfn, off, &mut buf[done..done + n]))
                .map_err(|source| GuestMemoryError::Host {
                    gpa: gpa.add(done as u64),
                    source,
                })
        })
    }

    /// Reads `buf.len()` bytes at `gpa` without faulting anything in (KVM's
    /// `kvm_vcpu_read_guest_atomic`): what the MMU reads under `mmu_lock`.
    /// A page the host has not resident now (swapped out, being migrated)
    /// is [`GuestMemoryError::NotResident`]; the caller treats the entry as
    /// changed and retries or zaps.
    pub fn read_atomic(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.for_each_page(gpa, buf.len(), false, false, |_, hva, done, n| {
            let off = hva.page_offset() as usize;
            self.host
                .with_resident_frame(hva, |a, pfn| a.read(pfn, off, &mut buf[done..done + n]))
                .ok_or(GuestMemoryError::NotResident {
                    gpa: gpa.add(done as u64),
                })
        })
    }

    /// Writes `buf` at `gpa`, marking the pages dirty.
    pub fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), GuestMemoryError> {
        self.write_logged(gpa, buf, true)
    }

    /// [`GuestMemory::write`] that leaves the dirty log to the caller (a
    /// vCPU's write, logged into its dirty ring when there is one).
    pub(crate) fn write_unlogged(&self, gpa: Gpa, buf: &[u8]) -> Result<(), GuestMemoryError> {
        self.write_logged(gpa, buf, false)
    }

    fn write_logged(&self, gpa: Gpa, buf: &[u8], log: bool) -> Result<(), GuestMemoryError> {
        self.for_each_page(gpa, buf.len(), true, log, |_, hva, done, n| {
            let off = hva.page_offset() as usize;
            self.host
                .with_frame(hva, true, |a, pfn| a.write(pfn, off, &buf[done..done + n]))
                .map_err(|source| GuestMemoryError::Host {
                    gpa: gpa.add(done as u64),
                    source,
                })
        })
    }

    /// Reads a little-endian value of `size` bytes (1..=8: the pieces of a
    /// split access may have any size); single-copy atomic when it does not
    /// cross an 8-byte boundary. Another size is
    /// [`GuestMemoryError::InvalidSize`].
    pub fn read_value(&self, gpa: Gpa, size: usize) -> Result<u64, GuestMemoryError> {
        if !(1..=8).contains(&size) {
            return Err(GuestMemoryError::InvalidSize { gpa, size });
        }
        let mut b = [0u8; 8];
        self.read(gpa, &mut b[..size])?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes the low `size` bytes (1..=8) of `val`; single-copy atomic when
    /// it does not cross an 8-byte boundary. Another size is
    /// [`GuestMemoryError::InvalidSize`].
    pub fn write_value(&self, gpa: Gpa, size: usize, val: u64) -> Result<(), GuestMemoryError> {
        if !(1..=8).contains(&size) {
            return Err(GuestMemoryError::InvalidSize { gpa, size });
        }
        self.write(gpa, &val.to_le_bytes()[..size])
    }

    /// Reads a `u8`.
    pub fn read_u8(&self, gpa: Gpa) -> Result<u8, GuestMemoryError> {
        self.read_value(gpa, 1).map(|v| v as u8)
    }
    /// Reads a `u16`.
    pub fn read_u16(&self, gpa: Gpa) -> Result<u16, GuestMemoryError> {
        self.read_value(gpa, 2).map(|v| v as u16)
    }
    /// Reads a `u32`.
    pub fn read_u32(&self, gpa: Gpa) -> Result<u32, GuestMemoryError> {
        self.read_value(gpa, 4).map(|v| v as u32)
    }
    /// Reads a `u64`.
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, GuestMemoryError> {
        self.read_value(gpa, 8)
    }
    /// Writes a `u8`.
    pub fn write_u8(&self, gpa: Gpa, v: u8) -> Result<(), GuestMemoryError> {
        self.write_value(gpa, 1, v.into())
    }
    /// Writes a `u16`.
    pub fn write_u16(&self, gpa: Gpa, v: u16) -> Result<(), GuestMemoryError> {
        self.write_value(gpa, 2, v.into())
    }
    /// Writes a `u32`.
    pub fn write_u32(&self, gpa: Gpa, v: u32) -> Result<(), GuestMemoryError> {
        self.write_value(gpa, 4, v.into())
    }
    /// Writes a `u64`.
    pub fn write_u64(&self, gpa: Gpa, v: u64) -> Result<(), GuestMemoryError> {
        self.write_value(gpa, 8, v)
    }

    /// Atomically replaces the naturally aligned `size`-byte (4 or 8) value
    /// at `gpa` with `new` if it holds `old`: `Ok(Ok(()))` on success (the
    /// page is marked dirty), `Ok(Err(current))` if it changed.
    pub fn cmpxchg(&self, gpa: Gpa, size: usize, old: u64, new: u64) -> Result<Result<(), u64>, GuestMemoryError> {
        if !matches!(size, 4 | 8) || !gpa.is_aligned(size as u64) {
            return Err(GuestMemoryError::Misaligned { gpa, size });
        }
        let mut out = Ok(());
        // Only a successful exchange dirties the page, as in KVM's A/D
        // update (`__try_cmpxchg_user`, then `mark_page_dirty`).
        self.for_each_page(gpa, size, true, false, |slot, hva, _, _| {
            let off = hva.page_offset() as usize;
            out = self
                .host
                .with_frame(hva, true, |a, pfn| a.cmpxchg_value(pfn, off, size, old, new))
                .map_err(|source| GuestMemoryError::Host { gpa, source })?;
            if out.is_ok() {
                slot.mark_page_dirty(gpa.frame());
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// [`GuestMemory::cmpxchg`] of a `u32`.
    pub fn cmpxchg_u32(&self, gpa: Gpa, old: u32, new: u32) -> Result<Result<(), u32>, GuestMemoryError> {
        self.cmpxchg(gpa, 4, old.into(), new.into())
            .map(|r| r.map_err(|v| v as u32))
    }

    /// [`GuestMemory::cmpxchg`] of a `u64`.
    pub fn cmpxchg_u64(&self, gpa: Gpa, old: u64, new: u64) -> Result<Result<(), u64>, GuestMemoryError> {
        self.cmpxchg(gpa, 8, old, new)
    }
}

impl PtMemory for GuestMemory {
    type Error = GuestMemoryError;

    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        self.read_value(gpa, size.bytes() as usize)
    }

    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error> {
        self.cmpxchg(gpa, size.bytes() as usize, old, new)
    }
}

impl From<GuestMemoryError> for VmError {
    fn from(e: GuestMemoryError) -> Self {
        match e {
            GuestMemoryError::GpaNotMapped { gpa } | GuestMemoryError::ReadOnlyMemslot { gpa, .. } => {
                VmError::InvalidGuestAddress(gpa.into())
            }
            GuestMemoryError::Overflow { .. } => VmError::GuestAddressOverflow,
            GuestMemoryError::Misaligned { .. } | GuestMemoryError::InvalidSize { .. } => {
                VmError::InvalidBackendAddress
            }
            GuestMemoryError::Host { .. } | GuestMemoryError::NotResident { .. } => VmError::HostAddressNotAvailable,
        }
    }
}

impl GuestMemory {
    /// The accessible prefix of `[addr, addr + len)` for rust-vmm's partial
    /// `read`/`write`: an error if not even the first byte is accessible.
    fn vm_prefix(&self, addr: GuestAddress, len: usize, write: bool) -> Result<usize, VmError> {
        if len == 0 {
            return Ok(0);
        }
        match self.mapped_prefix(addr.into(), len, write) {
            (0, Some(e)) => Err(e.into()),
            (n, _) => Ok(n),
        }
    }

    fn store_bytes(&self, addr: GuestAddress, bytes: &[u8]) -> Result<(), VmError> {
        let gpa: Gpa = addr.into();
        if !gpa.is_aligned(bytes.len() as u64) {
            return Err(VmError::InvalidBackendAddress);
        }
        Ok(self.write(gpa, bytes)?)
    }
}

impl Bytes<GuestAddress> for GuestMemory {
    type E = VmError;

    fn write(&self, buf: &[u8], addr: GuestAddress) -> Result<usize, VmError> {
        let n = self.vm_prefix(addr, buf.len(), true)?;
        GuestMemory::write(self, addr.into(), &buf[..n])?;
        Ok(n)
    }

    fn read(&self, buf: &mut [u8], addr: GuestAddress) -> Result<usize, VmError> {
        let n = self.vm_prefix(addr, buf.len(), false)?;
        GuestMemory::read(self, addr.into(), &mut buf[..n])?;
        Ok(n)
    }

    fn write_slice(&self, buf: &[u8], addr: GuestAddress) -> Result<(), VmError> {
        Ok(GuestMemory::write(self, addr.into(), buf)?)
    }

    fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> Result<(), VmError> {
        Ok(GuestMemory::read(self, addr.into(), buf)?)
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: GuestAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize, VmError> {
        let n = self.vm_prefix(addr, count, true)?;
        let mut bounce = vec![0u8; n];
        let got = src.read_volatile(&mut VolatileSlice::from(&mut bounce[..]))?;
        GuestMemory::write(self, addr.into(), &bounce[..got])?;
        Ok(got)
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: GuestAddress,
        src: &mut F,
        count: usize,
    ) -> Result<(), VmError> {
        if let (_, Some(e)) = self.mapped_prefix(addr.into(), count, true) {
            return Err(e.into());
        }
        let mut bounce = vec![0u8; count];
        src.read_exact_volatile(&mut VolatileSlice::from(&mut bounce[..]))?;
        Ok(GuestMemory::write(self, addr.into(), &bounce)?)
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: GuestAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize, VmError> {
        let n = self.vm_prefix(addr, count, false)?;
        let mut bounce = vec![0u8; n];
        GuestMemory::read(self, addr.into(), &mut bounce)?;
        Ok(dst.write_volatile(&VolatileSlice::from(&mut bounce[..]))?)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: GuestAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<(), VmError> {
        let mut bounce = vec![0u8; count];
        GuestMemory::read(self, addr.into(), &mut bounce)?;
        Ok(dst.write_all_volatile(&VolatileSlice::from(&mut bounce[..]))?)
    }

    fn store<T: AtomicAccess>(&self, val: T, addr: GuestAddress, _order: Ordering) -> Result<(), VmError> {
        // Naturally aligned accesses of at most 8 bytes are single-copy
        // atomic in the frame arena (one word, sequentially consistent
        // enough for any `order`: a release store or a CAS).
        self.store_bytes(addr, val.as_slice())
    }

    fn load<T: AtomicAccess>(&self, addr: GuestAddress, _order: Ordering) -> Result<T, VmError> {
        let gpa: Gpa = addr.into();
        let mut v = T::zeroed();
        if !gpa.is_aligned(std::mem::size_of::<T>() as u64) {
            return Err(VmError::InvalidBackendAddress);
        }
        GuestMemory::read(self, gpa, v.as_mut_slice())?;
        Ok(v)
    }
}
