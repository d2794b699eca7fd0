//! VM configurations drawn at random: `vmmu run --config random` draws
//! one from the seed, the soak test one per run, the `vm` fuzz target one
//! from its input. The configuration itself ([`VmConfig`]) and its rules
//! live with the VM builder in `vmmu::vm::config`.

use rand::Rng;

use vmmu::arch::control::Vendor;
use vmmu::vm::MmuKind;
use vmmu::vm::config::VmConfig;

use crate::guest::PagingFormat;

/// A configuration drawn from `rng`, valid for `mmu` (a dirty ring only
/// on the TDP MMU), and a paging mode it allows (unless `paging` is
/// given). Recovery periods are short, so a run of seconds sees the
/// NX recovery worker.
pub fn random(rng: &mut impl Rng, mmu: Option<MmuKind>) -> (VmConfig, PagingFormat) {
    let ept_ad = rng.random_bool(0.6);
    let pml = ept_ad && rng.random_bool(0.3);
    let ring = mmu == Some(MmuKind::Tdp) && !pml && rng.random_bool(0.25);
    let manual_protect = !ring && rng.random_bool(0.5);
    let la57 = rng.random_bool(0.8);
    let mut c = VmConfig {
        vendor: Vendor::Intel,
        ept_ad,
        pml,
        dirty_ring: if ring {
            [512u32, 4096, 65536][rng.random_range(0..3)]
        } else {
            0
        },
        manual_protect,
        initially_set: manual_protect && rng.random_bool(0.6),
        eager_split: rng.random_bool(0.7),
        nx_huge_pages: rng.random_bool(0.5),
        nx_recovery_ratio: [0u32, 1, 4, 60][rng.random_range(0..4)],
        nx_recovery_period_ms: [0u32, 20, 100, 500][rng.random_range(0..4)],
        max_page_size: [0x1000u64, 0x20_0000, 0x4000_0000, 0x4000_0000][rng.random_range(0..4)],
        ept_levels: if rng.random_bool(0.3) { 5 } else { 4 },
        mmu_pages: if rng.random_bool(0.3) {
            vmmu::mmu::shadow::MIN_MMU_PAGES << rng.random_range(0..4)
        } else {
            0
        },
        pku: rng.random_bool(0.5),
        smep: rng.random_bool(0.5),
        smap: rng.random_bool(0.5),
        la57,
    };
    // Drawn last, so a seed's other knobs stay what they were before AMD
    // hosts existed; NPT always has A/D and no PML.
    if rng.random_bool(0.3) {
        c.vendor = Vendor::Amd;
        c.ept_ad = true;
        c.pml = false;
    }
    let modes: &[&str] = if la57 {
        &["32-bit", "pae", "4-level", "5-level"]
    } else {
        &["32-bit", "pae", "4-level"]
    };
    let paging = PagingFormat::parse(modes[rng.random_range(0..modes.len())]).expect("a known mode");
    (c, paging)
}

/// [`random`] drawn from `seed` alone (`vmmu run --config
/// random --seed N`): the same seed gives the same configuration.
pub fn from_seed(seed: u64, mmu: Option<MmuKind>) -> (VmConfig, PagingFormat) {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ 0xc0f1_6000_d4a3);
    random(&mut rng, mmu)
}

/// Whether a run drawn from `seed` (`vmmu run --config random --seed N`,
/// the soak test) is a `--nested` one, and with how many L2 VMs: a quarter
/// of the TDP runs whose configuration `vm` has no dirty ring and whose
/// `memory` holds 2 to 4 L2 VMs; 0 otherwise. Drawn from its own stream,
/// so a seed's other knobs stay what they were before nested runs existed.
pub fn nested_from_seed(seed: u64, mmu: Option<MmuKind>, vm: &VmConfig, memory: u64) -> usize {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ 0x0e57_ed12_0b5e_55ed);
    if mmu != Some(MmuKind::Tdp) || vm.dirty_ring != 0 || !rng.random_bool(0.25) {
        return 0;
    }
    let vms = rng.random_range(2..=4usize);
    (2..=vms)
        .rev()
        .find(|&n| crate::nested::l2_memory(memory, n).is_some())
        .unwrap_or(0)
}

/// The seed threads' policies of a run drawn from `seed` (`vmmu run
/// --config random --seed N`, the soak test): each policy
/// ([`vmmu::vm::POLICY_KNOBS`]) takes one of its other safe values in a
/// quarter of the seeds, so every safe variant of every decision runs
/// under the checker with every configuration. Never an unsafe value.
/// Drawn from its own stream.
pub fn policies_from_seed(seed: u64) -> vmmu::vm::Policies {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ 0x90_11c1_e5d2_a3b1);
    let mut p = vmmu::vm::Policies::default();
    for k in &vmmu::vm::POLICY_KNOBS {
        let others: Vec<&str> = k.values[1..]
            .iter()
            .copied()
            .filter(|v| !k.unsafe_values.contains(v))
            .collect();
        if !others.is_empty() && rng.random_bool(0.25) {
            let v = others[rng.random_range(0..others.len())];
            p.set_from_str(&format!("{}={v}", k.name))
                .expect("a value of the knob's own table");
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use vmmu::arch::control::PagingMode;

    #[test]
    fn random_configurations_are_valid_and_cover_every_knob() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let mut seen_ring = false;
        let mut seen_init = false;
        let mut seen_5 = false;
        let mut seen_amd = false;
        for _ in 0..500 {
            for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
                let (c, paging) = random(&mut rng, Some(mmu));
                c.validate(mmu, paging.mode())
                    .unwrap_or_else(|e| panic!("{c:?}: {e:?}"));
                seen_ring |= c.dirty_ring != 0;
                seen_init |= c.initially_set;
                seen_5 |= paging.mode() == PagingMode::Level5;
                seen_amd |= c.vendor == Vendor::Amd;
            }
        }
        assert!(seen_ring && seen_init && seen_5 && seen_amd);
    }

    /// Nested runs are drawn for TDP runs without a dirty ring, with every
    /// count of L2 VMs, and only where the memory holds them.
    #[test]
    fn nested_runs_are_drawn_where_they_can_run() {
        let mut counts = [0u32; 5];
        for seed in 0..400 {
            for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
                let (c, _) = from_seed(seed, Some(mmu));
                let n = nested_from_seed(seed, Some(mmu), &c, 128 << 20);
                assert!(n == 0 || (mmu == MmuKind::Tdp && c.dirty_ring == 0), "seed {seed}");
                counts[n] += 1;
                assert_eq!(nested_from_seed(seed, Some(mmu), &c, 32 << 20), 0, "no room for 2 VMs");
                let small = nested_from_seed(seed, Some(mmu), &c, 40 << 20);
                assert!(small <= 2, "40 MiB holds 2 L2 VMs at most");
            }
        }
        assert!(counts[2] > 0 && counts[3] > 0 && counts[4] > 0, "{counts:?}");
    }

    /// Drawn policies are safe, and every safe value of every policy is
    /// drawn by some seed.
    #[test]
    fn drawn_policies_are_safe_and_cover_every_safe_value() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..400 {
            let p = policies_from_seed(seed);
            assert!(p.unsafe_ones().is_empty(), "seed {seed}: {p:?}");
            assert_eq!(policies_from_seed(seed), p);
            for k in &vmmu::vm::POLICY_KNOBS {
                seen.insert((k.name, k.get(&p)));
            }
        }
        for k in &vmmu::vm::POLICY_KNOBS {
            for v in k.values.iter().filter(|v| !k.unsafe_values.contains(v)) {
                assert!(seen.contains(&(k.name, *v)), "{}={v} never drawn", k.name);
            }
        }
    }

    #[test]
    fn a_workload_table_round_trips() {
        let c = VmConfig {
            max_page_size: 2 << 20,
            dirty_ring: 4096,
            ..VmConfig::default()
        };
        let s = toml::to_string(&c).unwrap();
        assert!(s.contains("max_page_size = \"2M\""), "{s}");
        assert_eq!(toml::from_str::<VmConfig>(&s).unwrap(), c);
        assert!(toml::from_str::<VmConfig>("max_page_size = \"3M\"").is_err());
    }
}
