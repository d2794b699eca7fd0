//! A plain, sparse guest-physical memory: every byte not written reads as
//! zero. The conformance runner builds one from a case; tests use it as a
//! reference memory. It can log the entries a walk reads.

use std::collections::HashMap;
use std::sync::Mutex;

use super::memory::{EntrySize, PtMemory};
use crate::addr::{Gpa, PAGE_SIZE};

/// A sparse guest-physical memory of 4 KiB pages, created on first write.
#[derive(Debug, Default)]
pub struct SparseMemory {
    pages: Mutex<HashMap<u64, Box<[u8; PAGE_SIZE as usize]>>>,
    read_log: Mutex<Option<Vec<Gpa>>>,
}

impl SparseMemory {
    /// An empty memory (all zero).
    pub fn new() -> SparseMemory {
        SparseMemory::default()
    }

    fn pages(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<[u8; PAGE_SIZE as usize]>>> {
        // A poisoned lock only means a panicking test thread; the map is
        // still consistent (every update is a single insert or copy).
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `buf.len()` bytes at `gpa` (may cross pages).
    pub fn read(&self, gpa: Gpa, buf: &mut [u8]) {
        let pages = self.pages();
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa.raw().wrapping_add(i as u64);
            *b = pages.get(&(a / PAGE_SIZE)).map_or(0, |p| p[(a % PAGE_SIZE) as usize]);
        }
    }

    /// Writes `data` at `gpa` (may cross pages).
    pub fn write(&self, gpa: Gpa, data: &[u8]) {
        let mut pages = self.pages();
        for (i, b) in data.iter().enumerate() {
            let a = gpa.raw().wrapping_add(i as u64);
            pages
                .entry(a / PAGE_SIZE)
                .or_insert_with(|| Box::new([0; PAGE_SIZE as usize]))[(a % PAGE_SIZE) as usize] = *b;
        }
    }

    /// Reads a little-endian value of `size` bytes (1..=8).
    pub fn read_uint(&self, gpa: Gpa, size: usize) -> u64 {
        let mut buf = [0u8; 8];
        self.read(gpa, &mut buf[..size]);
        u64::from_le_bytes(buf)
    }

    /// Writes the low `size` bytes (1..=8) of `value`, little-endian.
    pub fn write_uint(&self, gpa: Gpa, size: usize, value: u64) {
        self.write(gpa, &value.to_le_bytes()[..size]);
    }

    /// Starts recording the address of every entry read.
    pub fn start_read_log(&self) {
        *self.read_log.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// Stops recording and returns the addresses read since the start.
    pub fn take_read_log(&self) -> Vec<Gpa> {
        self.read_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    }
}

impl PtMemory for SparseMemory {
    type Error = std::convert::Infallible;

    fn read_entry(&self, gpa: Gpa, size: EntrySize) -> Result<u64, Self::Error> {
        if let Some(log) = self.read_log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            log.push(gpa);
        }
        Ok(self.read_uint(gpa, size.bytes() as usize))
    }

    fn cmpxchg_entry(&self, gpa: Gpa, size: EntrySize, old: u64, new: u64) -> Result<Result<(), u64>, Self::Error> {
        let n = size.bytes() as usize;
        // Hold the page map's lock across the compare and the store.
        let mut pages = self.pages();
        let mut cur = [0u8; 8];
        for (i, b) in cur[..n].iter_mut().enumerate() {
            let a = gpa.raw().wrapping_add(i as u64);
            *b = pages.get(&(a / PAGE_SIZE)).map_or(0, |p| p[(a % PAGE_SIZE) as usize]);
        }
        let cur = u64::from_le_bytes(cur);
        if cur != old {
            return Ok(Err(cur));
        }
        for (i, b) in new.to_le_bytes()[..n].iter().enumerate() {
            let a = gpa.raw().wrapping_add(i as u64);
            pages
                .entry(a / PAGE_SIZE)
                .or_insert_with(|| Box::new([0; PAGE_SIZE as usize]))[(a % PAGE_SIZE) as usize] = *b;
        }
        Ok(Ok(()))
    }
}
