//! The kernel's page-table editing: stores through the direct map (so
//! the MMU sees them as the processor would make them), page zeroing and
//! copying, and the walk, split and update of a process's tables.

use super::*;

impl Os {
    // ---- kernel memory access through the direct map ----

    /// A kernel store of one entry (4 or 8 bytes) at `gpa`.
    pub(super) fn store(&self, cpu: &mut GuestCpu, ck: &Checker, gpa: u64, value: u64) -> Result<(), OsError> {
        let size = self.format.entry_size() as usize;
        self.kernel_access(cpu, ck, gpa, AccessKind::Write, size, value)
            .map(|_| ())
    }

    pub(super) fn kernel_access(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        gpa: u64,
        kind: AccessKind,
        size: usize,
        value: u64,
    ) -> Result<u64, OsError> {
        let va = self.format.page_offset() + gpa;
        tracing::trace!(target: "vmmu_guest_store", gpa, value, write = kind == AccessKind::Write);
        let r = cpu.access(va, kind, 0, size, value)?;
        cpu.accesses += 1;
        match r {
            AccessResult::Done { gpa: got, value, mmio } if got.raw() == gpa && !mmio => Ok(value),
            other => {
                ck.violation(
                    cpu.id,
                    va,
                    gpa,
                    "a kernel access through the direct map to complete at this gpa",
                    &format!("{other:?}"),
                );
                Err(OsError::Kernel)
            }
        }
    }

    /// Zeroes the frame at `gpa` with `rep stosq` (Linux's `clear_page`).
    pub(super) fn zero(&self, cpu: &mut GuestCpu, ck: &Checker, gpa: u64, frames: u64) -> Result<(), OsError> {
        let va = self.format.page_offset() + gpa;
        let n = frames * 512;
        match cpu.rep_stos(va, n)? {
            AccessResult::Done { .. } => {
                cpu.accesses += n;
                ck.oracle().zero(gpa, frames << 12);
                Ok(())
            }
            other => {
                ck.violation(
                    cpu.id,
                    va,
                    gpa,
                    "rep stosq through the direct map to complete",
                    &format!("{other:?}"),
                );
                Err(OsError::Kernel)
            }
        }
    }

    /// Copies the stamped words of a page (the first word of each 64-byte
    /// line, the only ones user code writes) from `src` to `dst`, checking
    /// what it reads against the oracle.
    pub(super) fn copy_page(&self, cpu: &mut GuestCpu, ck: &Checker, src: u64, dst: u64) -> Result<(), OsError> {
        for line in 0..64 {
            let (s, d) = (src + line * 64, dst + line * 64);
            let v = self.kernel_access(cpu, ck, s, AccessKind::Read, 8, 0)?;
            let want = ck.oracle().get(s);
            if ck.level != crate::checker::CheckLevel::Off && v != want {
                ck.violation(
                    cpu.id,
                    self.format.page_offset() + s,
                    s,
                    &format!("{want:#x} (the last value written)"),
                    &format!("{v:#x}"),
                );
            }
            self.kernel_access(cpu, ck, d, AccessKind::Write, 8, v)?;
            ck.oracle().set(d, v);
        }
        Ok(())
    }

    // ---- page tables ----

    pub(super) fn key(&self, level: u8, va: u64) -> (u8, u64) {
        let top = self.format.levels();
        if level == top {
            (level, 0)
        } else {
            (level, va >> self.format.shift(level + 1))
        }
    }

    /// The table at `level` covering `va`, created (with the tables above
    /// it) if missing.
    pub(super) fn table(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        st: &mut MmState,
        va: u64,
        level: u8,
    ) -> Result<u64, OsError> {
        let top = self.format.levels();
        let mut parent = st.root;
        for l in (level..top).rev() {
            let key = self.key(l, va);
            if let Some(t) = st.tables.get(&key) {
                parent = t.gpa;
                continue;
            }
            let gpa = self.alloc_frame()? << 12;
            self.zero(cpu, ck, gpa, 1)?;
            self.store(
                cpu,
                ck,
                parent + self.format.index(va, l + 1) * self.format.entry_size(),
                self.format.table_entry(gpa, l + 1),
            )?;
            self.stats.tables_allocated.fetch_add(1, Ordering::Relaxed);
            st.tables
                .get_mut(&self.key(l + 1, va))
                .expect("every table's parent is in the table map")
                .used += 1;
            st.tables.insert(
                key,
                Table {
                    gpa,
                    used: 0,
                    pinned: false,
                },
            );
            parent = gpa;
        }
        Ok(parent)
    }

    /// Writes the leaf for `va` at `level`.
    pub(super) fn set_leaf(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        st: &mut MmState,
        va: u64,
        leaf: Leaf,
    ) -> Result<(), OsError> {
        let t = self.table(cpu, ck, st, va, leaf.level)?;
        let e = self.format.leaf_entry(leaf.gfn << 12, leaf.level, leaf.writable, true);
        self.store(
            cpu,
            ck,
            t + self.format.index(va, leaf.level) * self.format.entry_size(),
            e,
        )?;
        if st.leaves.insert(va >> 12, leaf).is_none() {
            st.tables
                .get_mut(&self.key(leaf.level, va))
                .expect("the leaf's table exists")
                .used += 1;
        }
        Ok(())
    }

    /// Clears the leaf at `va`; empty tables are unlinked and returned in
    /// `freed` (to be freed after the flush).
    pub(super) fn clear_leaf(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        st: &mut MmState,
        va: u64,
        freed: &mut Vec<u64>,
    ) -> Result<Option<Leaf>, OsError> {
        let Some(leaf) = st.leaves.remove(&(va >> 12)) else {
            return Ok(None);
        };
        let mut level = leaf.level;
        loop {
            let key = self.key(level, va);
            let t = st.tables.get_mut(&key).expect("a leaf's tables exist");
            self.store(
                cpu,
                ck,
                t.gpa + self.format.index(va, level) * self.format.entry_size(),
                0,
            )?;
            t.used -= 1;
            if t.used > 0 || t.pinned || level == self.format.levels() {
                break;
            }
            let t = st.tables.remove(&key).expect("just seen");
            freed.push(t.gpa);
            level += 1;
        }
        Ok(Some(leaf))
    }

    /// Splits the huge leaf at `base` into a table of 4 KiB leaves.
    pub(super) fn split_huge(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        st: &mut MmState,
        base: u64,
    ) -> Result<(), OsError> {
        let leaf = st.leaves[&(base >> 12)];
        let gpa = self.alloc_frame()? << 12;
        self.zero(cpu, ck, gpa, 1)?;
        self.stats.tables_allocated.fetch_add(1, Ordering::Relaxed);
        let es = self.format.entry_size();
        for i in 0..512 {
            let e = self.format.leaf_entry((leaf.gfn + i) << 12, 1, leaf.writable, true);
            self.store(cpu, ck, gpa + i * es, e)?;
        }
        let pd = st.tables[&self.key(2, base)].gpa;
        self.store(
            cpu,
            ck,
            pd + self.format.index(base, 2) * es,
            self.format.table_entry(gpa, 2),
        )?;
        st.tables.insert(
            self.key(1, base),
            Table {
                gpa,
                used: 512,
                pinned: false,
            },
        );
        st.leaves.remove(&(base >> 12));
        for i in 0..512 {
            st.leaves.insert(
                (base >> 12) + i,
                Leaf {
                    gfn: leaf.gfn + i,
                    level: 1,
                    ..leaf
                },
            );
        }
        self.stats.huge_splits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Splits every huge leaf that `[start, end)` covers only in part.
    pub(super) fn split_partial(
        &self,
        cpu: &mut GuestCpu,
        ck: &Checker,
        st: &mut MmState,
        start: u64,
        end: u64,
        flush: &mut Flush,
    ) -> Result<(), OsError> {
        let hs = self.format.huge_size();
        for edge in [start, end] {
            if edge % hs == 0 {
                continue;
            }
            let base = edge & !(hs - 1);
            if st.leaves.get(&(base >> 12)).is_some_and(|l| l.level == 2) {
                self.split_huge(cpu, ck, st, base)?;
                flush.huge(base, hs);
            }
        }
        Ok(())
    }
}
