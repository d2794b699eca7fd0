//! The guest's physical page allocator: 4 KiB frames on a LIFO free list
//! (a freed page-table page is the next page handed out, as with Linux's
//! per-CPU page lists: that reuse is what drives the shadow MMU's
//! flooding, unsync and unprotect paths), 2 MiB blocks for huge pages,
//! and a reference count per frame for copy-on-write sharing.

/// Frames per 2 MiB block.
pub const BLOCK_FRAMES: u64 = 512;

/// The allocator of guest-physical frames `[first, end)`.
#[derive(Debug)]
pub struct FrameAllocator {
    free_4k: Vec<u64>,
    free_2m: Vec<u64>,
    refs: Vec<u32>,
    first: u64,
    end: u64,
    free: u64,
}

impl FrameAllocator {
    /// Manages frames `first..end` (gfns); whole 2 MiB blocks go to the
    /// block list, the rest to the 4 KiB list.
    pub fn new(first: u64, end: u64) -> FrameAllocator {
        let first_block = first.next_multiple_of(BLOCK_FRAMES);
        let end_block = end / BLOCK_FRAMES * BLOCK_FRAMES;
        let mut free_4k: Vec<u64> = (first..first_block.min(end)).chain(end_block.max(first)..end).collect();
        free_4k.reverse();
        let mut free_2m: Vec<u64> = (first_block..end_block).step_by(BLOCK_FRAMES as usize).collect();
        free_2m.reverse();
        FrameAllocator {
            free_4k,
            free_2m,
            refs: vec![0; (end - first) as usize],
            first,
            end,
            free: end - first,
        }
    }

    /// Free frames.
    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// Frames managed.
    pub fn total_frames(&self) -> u64 {
        self.end - self.first
    }

    fn slot(&mut self, gfn: u64) -> &mut u32 {
        assert!(
            (self.first..self.end).contains(&gfn),
            "gfn {gfn:#x} is outside the allocator's frames (the guest OS only frees what it allocated)"
        );
        &mut self.refs[(gfn - self.first) as usize]
    }

    /// One 4 KiB frame with one reference, or `None` when memory is full.
    pub fn alloc(&mut self) -> Option<u64> {
        let gfn = match self.free_4k.pop() {
            Some(g) => g,
            None => {
                let block = self.free_2m.pop()?;
                self.free_4k.extend((block + 1..block + BLOCK_FRAMES).rev());
                block
            }
        };
        *self.slot(gfn) = 1;
        self.free -= 1;
        Some(gfn)
    }

    /// A 2 MiB block (its first gfn), every frame with one reference.
    pub fn alloc_block(&mut self) -> Option<u64> {
        let block = self.free_2m.pop()?;
        for g in block..block + BLOCK_FRAMES {
            *self.slot(g) = 1;
        }
        self.free -= BLOCK_FRAMES;
        Some(block)
    }

    /// Takes another reference to an allocated frame (a COW share).
    pub fn get(&mut self, gfn: u64) {
        let r = self.slot(gfn);
        assert!(*r > 0, "a reference to free frame {gfn:#x}");
        *r += 1;
    }

    /// References to `gfn`.
    pub fn refs(&mut self, gfn: u64) -> u32 {
        *self.slot(gfn)
    }

    /// Drops a reference; the frame is free when none is left. Returns
    /// whether it was freed.
    pub fn put(&mut self, gfn: u64) -> bool {
        let r = self.slot(gfn);
        assert!(*r > 0, "double free of frame {gfn:#x}");
        *r -= 1;
        if *r == 0 {
            self.free_4k.push(gfn);
            self.free += 1;
            true
        } else {
            false
        }
    }

    /// Drops a reference to each frame of a block; a block whose frames
    /// all become free returns whole to the block list.
    pub fn put_block(&mut self, block: u64) {
        let whole = (block..block + BLOCK_FRAMES).all(|g| self.refs[(g - self.first) as usize] == 1);
        if whole {
            for g in block..block + BLOCK_FRAMES {
                *self.slot(g) = 0;
            }
            self.free_2m.push(block);
            self.free += BLOCK_FRAMES;
        } else {
            for g in block..block + BLOCK_FRAMES {
                self.put(g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_frame_is_the_next_one_handed_out() {
        let mut a = FrameAllocator::new(256, 2048);
        let x = a.alloc().unwrap();
        let _y = a.alloc().unwrap();
        assert!(a.put(x));
        assert_eq!(a.alloc(), Some(x));
    }

    #[test]
    fn shared_frames_are_freed_by_the_last_reference() {
        let mut a = FrameAllocator::new(0, 1024);
        let x = a.alloc().unwrap();
        a.get(x);
        assert!(!a.put(x));
        assert!(a.put(x));
        assert_eq!(a.free_frames(), 1024);
    }

    #[test]
    fn blocks_come_whole_and_go_back_whole() {
        let mut a = FrameAllocator::new(0, 1024);
        let b = a.alloc_block().unwrap();
        assert_eq!(b % BLOCK_FRAMES, 0);
        assert_eq!(a.free_frames(), 512);
        a.put_block(b);
        assert_eq!(a.free_frames(), 1024);
        assert!(a.alloc_block().is_some() && a.alloc_block().is_some());
        assert!(a.alloc_block().is_none());
        assert!(a.alloc().is_none());
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn a_double_free_is_caught() {
        let mut a = FrameAllocator::new(0, 1024);
        let x = a.alloc().unwrap();
        a.put(x);
        a.put(x);
    }
}
