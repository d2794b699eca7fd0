//! `cargo bench --bench walk`: 4-level guest walks against the reference of
//! four dependent 8-byte loads over the same tables.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use vmmu::addr::{Gpa, Gva};
use vmmu::arch::perm::Access;
use vmmu::walker::Root;
use vmmu_bench::walk::{WalkSetup, lm4_paging, reference_loads};

fn walk(c: &mut Criterion) {
    let setup = WalkSetup::new(vmmu_bench::walk::FANOUT, 4096);
    let paging = lm4_paging();
    let root = Root::Table(Gpa::new(setup.root));
    let mut i = 0usize;
    c.bench_function("walk/lm4", |b| {
        b.iter(|| {
            i = (i + 1) & (setup.vas.len() - 1);
            paging
                .walk(
                    &setup.mem,
                    &root,
                    Gva::new(black_box(setup.vas[i])),
                    Access::supervisor_read(),
                    0,
                )
                .ok()
                .map(|w| w.gpa)
        })
    });
    let mut j = 0usize;
    c.bench_function("walk/reference-4-loads", |b| {
        b.iter(|| {
            j = (j + 1) & (setup.vas.len() - 1);
            reference_loads(&setup.mem, setup.root, black_box(&setup.vas[j..j + 1]), 1, false)
        })
    });
    let r = vmmu_bench::walk::run(2_000_000);
    println!(
        "walk: {:.1} ns/walk, reference {:.1} ns, ratio {:.2} (goal <= 3)",
        r.per_op_ns, r.reference_ns, r.ratio
    );
}

criterion_group!(benches, walk);
criterion_main!(benches);
