//! The mm system calls: address spaces created, mapped, unmapped,
//! protected, remapped, forked and torn down; the guest's #PF handler; and
//! the TLB maintenance each change owes (INVLPG, full flushes,
//! shootdowns).

use super::*;

impl Os {
    // ---- processes ----

    /// Creates an address space with the kernel half and no mappings.
    pub fn create_mm(&self, cpu: &mut GuestCpu, ck: &Checker, nthreads: u32) -> Result<Arc<Mm>, OsError> {
        let root = self.alloc_frame()? << 12;
        self.zero(cpu, ck, root, 1)?;
        let es = self.format.entry_size();
        for &(i, e) in &self.kernel_entries {
            self.store(cpu, ck, root + i * es, e)?;
        }
        let top = self.format.levels();
        let mut st = MmState {
            root,
            vmas: BTreeMap::new(),
            leaves: BTreeMap::new(),
            tables: BTreeMap::from([(
                (top, 0),
                Table {
                    gpa: root,
                    used: 0,
                    pinned: true,
                },
            )]),
            dead: false,
        };
        if self.format.mode() == vmmu::arch::control::PagingMode::Pae {
            // The user PDPTEs are fixed for the process's life: PDPTEs are
            // loaded at CR3 load, so Linux never changes them either.
            for i in 0..3u64 {
                let va = i << 30;
                self.table(cpu, ck, &mut st, va, 2)?;
                st.tables.get_mut(&self.key(2, va)).expect("just made").pinned = true;
            }
        }
        self.stats.processes.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Mm {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            root,
            state: RwLock::new(st),
            cpumask: AtomicU64::new(0),
            tlb_gen: AtomicU64::new(1),
            threads: AtomicU32::new(nthreads),
            nthreads,
        }))
    }

    /// A free place for `len` bytes (aligned to `align`) in `st`, picked
    /// by `pick` (a random number) when `spread`, else the lowest.
    pub(super) fn place(&self, st: &MmState, len: u64, align: u64, spread: bool, pick: u64) -> Option<u64> {
        let (lo, hi) = self.format.user_window();
        let free =
            |s: u64| s >= lo && s + len <= hi && st.vmas.range(..s + len).next_back().is_none_or(|(_, v)| v.end <= s);
        if spread {
            for k in 0..16u64 {
                let slots = (hi - lo - len) / align;
                let s = lo + (pick.wrapping_add(k.wrapping_mul(0x9e37_79b9)) % slots) * align;
                if free(s) {
                    return Some(s);
                }
            }
        }
        let mut s = lo;
        for v in st.vmas.values() {
            if v.start >= s + len {
                break;
            }
            s = s.max(v.end.next_multiple_of(align));
        }
        free(s).then_some(s)
    }

    /// `mmap`: a new mapping of `pages` pages; none are mapped yet.
    pub fn mmap(&self, mm: &Mm, pages: u64, writable: bool, huge: bool, spread: bool, pick: u64) -> Option<Vma> {
        let mut st = mm.state.write();
        let hs = self.format.huge_size();
        let huge = huge && self.format.mode() != vmmu::arch::control::PagingMode::Bits32;
        let len = if huge {
            (pages << 12).next_multiple_of(hs)
        } else {
            pages << 12
        };
        let align = if huge { hs } else { 2 << 20 };
        let start = self.place(&st, len, align, spread, pick)?;
        let vma = Vma {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            start,
            end: start + len,
            writable,
            huge,
        };
        st.vmas.insert(start, vma);
        Some(vma)
    }

    /// Removes `[start, end)` from the mappings (splitting them).
    pub(super) fn carve(&self, st: &mut MmState, start: u64, end: u64, change: Option<bool>) {
        let hit: Vec<Vma> = st
            .vmas
            .values()
            .filter(|v| v.start < end && v.end > start)
            .copied()
            .collect();
        for v in hit {
            st.vmas.remove(&v.start);
            if v.start < start {
                st.vmas.insert(v.start, Vma { end: start, ..v });
            }
            if v.end > end {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                st.vmas.insert(end, Vma { id, start: end, ..v });
            }
            if let Some(w) = change {
                let (s, e) = (v.start.max(start), v.end.min(end));
                let id = if v.start < start {
                    self.next_id.fetch_add(1, Ordering::Relaxed)
                } else {
                    v.id
                };
                st.vmas.insert(
                    s,
                    Vma {
                        id,
                        start: s,
                        end: e,
                        writable: w,
                        ..v
                    },
                );
            }
        }
    }

    /// `munmap` of `[start, end)` in `mm`, which runs on `cpu`.
    pub fn munmap(&self, cpu: &mut GuestCpu, ck: &Checker, mm: &Mm, start: u64, end: u64) -> Result<u64, OsError> {
        let mut st = mm.state.write();
        let mut freed_tables = Vec::new();
        let mut frames = Vec::new();
        self.changing(cpu, mm, &mut st, |os, cpu, st, flush| {
            os.split_partial(cpu, ck, st, start, end, flush)?;
            let vpns = st.leaf_pages(start, end);
            for vpn in vpns {
                let va = vpn << 12;
                if let Some(l) = os.clear_leaf(cpu, ck, st, va, &mut freed_tables)? {
                    let size = if l.level == 2 { os.format.huge_size() } else { 4096 };
                    flush.huge(va, size);
                    frames.push(l);
                }
            }
            os.carve(st, start, end, None);
            if !freed_tables.is_empty() {
                flush.full = true;
            }
            Ok(())
        })?;
        let mut a = self.alloc.lock();
        for l in &frames {
            if l.level == 2 {
                a.put_block(l.gfn);
            } else {
                a.put(l.gfn);
            }
        }
        for t in &freed_tables {
            a.put(t >> 12);
        }
        self.stats
            .tables_freed
            .fetch_add(freed_tables.len() as u64, Ordering::Relaxed);
        Ok(frames.len() as u64)
    }

    /// `mprotect` of `[start, end)` to `writable`.
    pub fn mprotect(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        mm: &Mm,
        start: u64,
        end: u64,
        writable: bool,
    ) -> Result<(), OsError> {
        let mut st = mm.state.write();
        self.changing(cpu, mm, &mut st, |os, cpu, st, flush| {
            os.split_partial(cpu, ck, st, start, end, flush)?;
            let vpns = st.leaf_pages(start, end);
            for vpn in vpns {
                let l = st.leaves[&vpn];
                let w = writable && !l.cow;
                if l.writable != w {
                    os.set_leaf(cpu, ck, st, vpn << 12, Leaf { writable: w, ..l })?;
                    flush.huge(vpn << 12, if l.level == 2 { os.format.huge_size() } else { 4096 });
                }
            }
            os.carve(st, start, end, Some(writable));
            Ok(())
        })
    }

    /// Moves up to `max` mapped private 4 KiB pages of `vma` from page
    /// `first` on to fresh frames (copying them): live PTE rewrites.
    pub fn remap(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        mm: &Mm,
        vma_id: u64,
        first: u64,
        max: u64,
    ) -> Result<u64, OsError> {
        let mut st = mm.state.write();
        let Some(vma) = st.vma(vma_id) else { return Ok(0) };
        let mut old = Vec::new();
        let moved = self.changing(cpu, mm, &mut st, |os, cpu, st, flush| {
            for p in 0..vma.pages() {
                if old.len() as u64 >= max {
                    break;
                }
                let va = vma.start + (((first + p) % vma.pages()) << 12);
                let Some(&l) = st.leaves.get(&(va >> 12)) else { continue };
                if l.level != 1 || l.cow {
                    continue;
                }
                let new = os.alloc_frame()?;
                os.copy_page(cpu, ck, l.gfn << 12, new << 12)?;
                os.set_leaf(cpu, ck, st, va, Leaf { gfn: new, ..l })?;
                flush.huge(va, 4096);
                old.push(l.gfn);
            }
            Ok(())
        });
        // The frames moved from are free once flushed, also when the
        // remap stopped early (out of memory).
        let mut a = self.alloc.lock();
        for g in &old {
            a.put(*g);
        }
        drop(a);
        moved?;
        Ok(old.len() as u64)
    }

    /// The guest's #PF handler for a user access of `kind` at `va`.
    pub fn page_fault(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        mm: &Mm,
        va: u64,
        write: bool,
    ) -> Result<FaultFix, OsError> {
        self.stats.guest_faults.fetch_add(1, Ordering::Relaxed);
        let mut st = mm.state.write();
        let Some(vma) = st.vmas.range(..=va).next_back().map(|(_, v)| *v).filter(|v| va < v.end) else {
            return Ok(FaultFix::Segv);
        };
        if write && !vma.writable {
            return Ok(FaultFix::Segv);
        }
        if let Some((base, l)) = st.leaf(&self.format, va) {
            if !write || l.writable {
                return Ok(FaultFix::Spurious);
            }
            // Copy-on-write.
            self.stats.cow_breaks.fetch_add(1, Ordering::Relaxed);
            let sole = self.alloc.lock().refs(l.gfn) == 1;
            let gfn = if sole {
                l.gfn
            } else {
                let new = self.alloc_frame()?;
                self.copy_page(cpu, ck, l.gfn << 12, new << 12)?;
                new
            };
            self.set_leaf(
                cpu,
                ck,
                &mut st,
                base,
                Leaf {
                    gfn,
                    writable: true,
                    cow: false,
                    level: 1,
                },
            )?;
            let mut flush = Flush::default();
            flush.huge(base, 4096);
            self.flush(cpu, mm, &st, flush)?;
            if !sole {
                self.alloc.lock().put(l.gfn);
            }
            return Ok(FaultFix::Fixed);
        }
        // Demand paging: a huge page where the mapping covers it whole.
        let hs = self.format.huge_size();
        let base = va & !(hs - 1);
        if vma.huge && base >= vma.start && base + hs <= vma.end && !st.tables.contains_key(&self.key(1, base)) {
            let block = self.alloc.lock().alloc_block();
            if let Some(block) = block {
                self.zero(cpu, ck, block << 12, hs >> 12)?;
                self.set_leaf(
                    cpu,
                    ck,
                    &mut st,
                    base,
                    Leaf {
                        gfn: block,
                        writable: vma.writable,
                        cow: false,
                        level: 2,
                    },
                )?;
                return Ok(FaultFix::Fixed);
            }
        }
        let gfn = self.alloc_frame()?;
        self.zero(cpu, ck, gfn << 12, 1)?;
        self.set_leaf(
            cpu,
            ck,
            &mut st,
            va & !0xfff,
            Leaf {
                gfn,
                writable: vma.writable,
                cow: false,
                level: 1,
            },
        )?;
        Ok(FaultFix::Fixed)
    }

    /// `fork`: a child with a copy of `parent`'s mappings; private pages
    /// shared copy-on-write (huge mappings are not inherited, as with
    /// `MADV_DONTFORK`).
    pub fn fork(&self, cpu: &mut GuestCpu, ck: &Checker, parent: &Mm) -> Result<Arc<Mm>, OsError> {
        let child = self.create_mm(cpu, ck, 1)?;
        let mut ps = parent.state.write();
        let mut cs = child.state.write();
        let vpns = ps.leaf_pages(0, u64::MAX);
        for v in ps.vmas.values().filter(|v| !v.huge) {
            cs.vmas.insert(v.start, *v);
        }
        // The parent's PTEs become read-only: flushed even if the copy
        // stops early (out of memory for the child's tables), so no vCPU
        // keeps writing a frame that is now shared.
        let copied = self.changing(cpu, parent, &mut ps, |os, cpu, ps, flush| {
            flush.full = true;
            for vpn in vpns {
                let l = ps.leaves[&vpn];
                let va = vpn << 12;
                if l.level != 1 || cs.vmas.range(..=va).next_back().is_none_or(|(_, v)| va >= v.end) {
                    continue;
                }
                // Shared from now on: read-only and copy-on-write in both,
                // whatever the protection (a later mprotect must not make a
                // shared frame writable).
                let shared = Leaf {
                    writable: false,
                    cow: true,
                    ..l
                };
                if l.writable {
                    os.set_leaf(cpu, ck, ps, va, shared)?;
                } else {
                    ps.leaves.insert(vpn, shared);
                }
                os.set_leaf(cpu, ck, &mut cs, va, shared)?;
                os.alloc.lock().get(l.gfn);
            }
            Ok(())
        });
        if let Err(e) = copied {
            // The half-built child goes; what it shares stays shared.
            drop((cs, ps));
            self.exit(&child);
            return Err(e);
        }
        Ok(child.clone())
    }

    /// One thread of `mm` exits; the last one tears the address space
    /// down. `cpu` must not be running `mm`.
    pub fn exit(&self, mm: &Mm) {
        if mm.threads.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let mut st = mm.state.write();
        let mut a = self.alloc.lock();
        for l in st.leaves.values() {
            if l.level == 2 {
                a.put_block(l.gfn);
            } else {
                a.put(l.gfn);
            }
        }
        for t in st.tables.values() {
            a.put(t.gpa >> 12);
        }
        self.stats
            .tables_freed
            .fetch_add(st.tables.len() as u64, Ordering::Relaxed);
        st.leaves.clear();
        st.tables.clear();
        st.vmas.clear();
        st.dead = true;
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    // ---- TLB maintenance ----

    /// Runs `work`, which changes `mm`'s live page tables and records in
    /// its [`Flush`] what the change must flush, then flushes that,
    /// whether `work` finished or stopped early (out of guest memory, a
    /// kernel access the checker refused): an entry changed is an entry
    /// flushed, or another vCPU keeps using the old translation.
    pub(super) fn changing<T>(
        &self,
        cpu: &mut GuestCpu,
        mm: &Mm,
        st: &mut MmState,
        work: impl FnOnce(&Os, &mut GuestCpu, &mut MmState, &mut Flush) -> Result<T, OsError>,
    ) -> Result<T, OsError> {
        let mut flush = Flush::default();
        let r = work(self, cpu, st, &mut flush);
        let flushed = self.flush(cpu, mm, st, flush);
        let r = r?;
        flushed?;
        Ok(r)
    }

    /// Flushes `flush` of `mm` here (if it runs here) and on every other
    /// vCPU running it; called with the mm's lock held for writing.
    pub(super) fn flush(&self, cpu: &mut GuestCpu, mm: &Mm, st: &MmState, flush: Flush) -> Result<(), OsError> {
        if flush.is_empty() {
            return Ok(());
        }
        let tlb_gen = mm.tlb_gen.fetch_add(1, Ordering::AcqRel) + 1;
        let pages = (!flush.full && flush.pages.len() as u64 <= FLUSH_CEILING).then_some(flush.pages);
        if cpu.current.as_ref().is_some_and(|c| c.id == mm.id) {
            cpu.apply(self, mm.id, tlb_gen, pages.as_deref(), st.root)?;
        }
        let mask = mm.cpumask.load(Ordering::Acquire) & !(1 << cpu.id);
        for other in 0..self.mailboxes.len() {
            if mask & (1 << other) != 0 {
                self.mailboxes[other].lock().push(Shootdown {
                    mm: mm.id,
                    tlb_gen,
                    pages: pages.clone(),
                });
                self.stats.shootdowns.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
