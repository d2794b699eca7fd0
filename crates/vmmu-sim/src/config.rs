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
