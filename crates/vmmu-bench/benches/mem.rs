//! `cargo bench --bench mem`: memslot lookup with 1, 64 and 32,768 slots
//! (binary search, then the per-vCPU last-used-slot cache), and hva → host
//! frame translation through the host address space.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use vmmu::addr::{Gfn, Gpa, Hva, PAGE_SIZE};
use vmmu::host::{FrameArena, HostAddressSpace, VmaFlags};
use vmmu::mem::{MemoryRegion, MemslotFlags, MemslotTable, SlotCache};

/// A table of `n` 2 MiB slots, spaced 4 MiB apart in gpa.
fn table(n: u16) -> MemslotTable {
    let t = MemslotTable::default();
    for i in 0..n {
        let i64 = u64::from(i);
        t.create(MemoryRegion {
            as_id: 0,
            id: i,
            flags: MemslotFlags::empty(),
            guest_phys_addr: Gpa::new(i64 * (4 << 20)),
            memory_size: 2 << 20,
            userspace_addr: Hva::new(0x1000_0000 + i64 * (2 << 20)),
        })
        .expect("disjoint, aligned slots");
    }
    t
}

fn memslot_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("memslot_lookup");
    for n in [1u16, 64, 32768] {
        let t = table(n);
        let slots = t.load(0);
        // Random slots: every lookup is a binary search.
        let gfns: Vec<Gfn> = (0..4096u64)
            .map(|i| {
                let s = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) % u64::from(n);
                Gfn::new(s * 1024 + (i % 512))
            })
            .collect();
        let mut i = 0;
        g.bench_function(format!("{n}_slots/search"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(slots.lookup(black_box(gfns[i]))).map(|s| s.id())
            })
        });
        // The same slot again and again: the last-used cache hits.
        let mut cache = SlotCache::default();
        let mut j = 0u64;
        let base = u64::from(n / 2) * 1024;
        g.bench_function(format!("{n}_slots/cached_hit"), |b| {
            b.iter(|| {
                j = (j + 1) & 511;
                black_box(slots.lookup_cached(black_box(Gfn::new(base + j)), &mut cache)).map(|s| s.id())
            })
        });
        let mut k = 0;
        g.bench_function(format!("{n}_slots/cached_miss"), |b| {
            b.iter(|| {
                k = (k + 1) & 4095;
                black_box(slots.lookup_cached(black_box(gfns[k]), &mut cache)).map(|s| s.id())
            })
        });
    }
    g.finish();
}

fn hva_translation(c: &mut Criterion) {
    let arena = Arc::new(FrameArena::with_reserve(4 << 30).expect("4 GiB reservation"));
    let host = HostAddressSpace::new(arena).expect("a root table");
    let (small, huge) = (0x1000_0000u64, 0x4000_0000u64);
    host.mmap(Hva::new(small), 16 << 20, VmaFlags::WRITE)
        .expect("fresh range");
    host.mmap(Hva::new(huge), 16 << 20, VmaFlags::WRITE | VmaFlags::THP)
        .expect("fresh range");
    for off in (0..16 << 20).step_by(PAGE_SIZE as usize) {
        host.fault_in(Hva::new(small + off), true).expect("mapped");
        host.fault_in(Hva::new(huge + off), true).expect("mapped");
    }
    let mut g = c.benchmark_group("hva_to_pfn");
    for (name, base) in [("4k", small), ("2m", huge)] {
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(host.lookup(black_box(Hva::new(base + i * PAGE_SIZE)))).map(|l| l.pfn)
            })
        });
    }
    let mut i = 0u64;
    g.bench_function("read_u64_4k", |b| {
        let mut buf = [0u8; 8];
        b.iter(|| {
            i = (i + 1) & 4095;
            host.read(black_box(Hva::new(small + i * PAGE_SIZE)), &mut buf)
                .expect("mapped");
            buf
        })
    });
    g.finish();
}

criterion_group!(benches, memslot_lookup, hva_translation);
criterion_main!(benches);
