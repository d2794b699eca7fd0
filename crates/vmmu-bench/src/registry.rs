//! Every benchmark `vmmu bench` runs, and which MMU each measures: the
//! command line names them, this says what they are.

use vmmu::vm::MmuKind;

use crate::Report;
use crate::tdp::{BenchError, TdpBenchConfig};

/// A benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Benchmark {
    /// 4-level guest walks against four dependent loads.
    Walk,
    /// Guest accesses served by the vCPU's TLB, on both MMUs.
    TlbHit,
    /// TLB misses refilled by the hardware model's walk, on both MMUs.
    TlbMiss,
    /// vCPUs faulting in their memory with 4K writes (KVM's
    /// `demand_paging_test`), on either MMU.
    Populate,
    /// Enable dirty logging, dirty every page, harvest (KVM's
    /// `dirty_log_perf_test`).
    DirtyLog,
    /// The wait of `zap_all_fast` with 1 GiB and 16 GiB mapped.
    ZapAll,
    /// Age every page, then re-access it, with EPT A/D on and off (KVM's
    /// `access_tracking_perf_test`).
    AccessTracking,
    /// Guest CR3 switches on the shadow MMU: `prev_roots` hits against
    /// misses and rebuilds.
    Cr3Switch,
    /// A guest store to its own page table on the shadow MMU, emulated.
    WpEmulate,
    /// An L2 guest's fault on the nested MMU against its L1 hypervisor's
    /// on the TDP MMU (AMD).
    NestedFault,
}

/// Which MMUs a benchmark measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mmus {
    /// No MMU (the walker alone).
    None,
    /// Both, in one run, each phase named by its MMU (`nested-fault`: the
    /// TDP MMU for L1 and the nested MMU for L2).
    Both,
    /// Either, the one asked for (the TDP MMU unless told).
    Either,
    /// The TDP MMU only.
    Tdp,
    /// The shadow MMU only.
    Shadow,
}

impl Benchmark {
    /// Every benchmark, in the order `vmmu bench all` runs them.
    pub const ALL: [Benchmark; 10] = [
        Benchmark::Walk,
        Benchmark::TlbHit,
        Benchmark::TlbMiss,
        Benchmark::Populate,
        Benchmark::DirtyLog,
        Benchmark::ZapAll,
        Benchmark::AccessTracking,
        Benchmark::Cr3Switch,
        Benchmark::WpEmulate,
        Benchmark::NestedFault,
    ];

    /// Which MMUs it measures.
    pub fn mmus(self) -> Mmus {
        match self {
            Benchmark::Walk => Mmus::None,
            Benchmark::TlbHit | Benchmark::TlbMiss | Benchmark::NestedFault => Mmus::Both,
            Benchmark::Populate => Mmus::Either,
            Benchmark::DirtyLog | Benchmark::ZapAll | Benchmark::AccessTracking => Mmus::Tdp,
            Benchmark::Cr3Switch | Benchmark::WpEmulate => Mmus::Shadow,
        }
    }

    /// The benchmarks `vmmu bench all --mmu <mmu>` runs: those that
    /// measure that MMU alone or the one chosen.
    pub fn on(mmu: MmuKind) -> Vec<Benchmark> {
        Benchmark::ALL
            .into_iter()
            .filter(|b| match b.mmus() {
                Mmus::Either => true,
                Mmus::Tdp => mmu == MmuKind::Tdp,
                Mmus::Shadow => mmu == MmuKind::Shadow,
                Mmus::None | Mmus::Both => false,
            })
            .collect()
    }

    /// Whether `--mmu <mmu>` makes sense for it; the error says why not.
    pub fn check_mmu(self, mmu: Option<MmuKind>) -> Result<(), String> {
        match (self.mmus(), mmu) {
            (_, None) | (Mmus::Either | Mmus::Tdp | Mmus::None, Some(MmuKind::Tdp)) => Ok(()),
            (Mmus::Either | Mmus::Shadow, Some(MmuKind::Shadow)) => Ok(()),
            (Mmus::Shadow, Some(MmuKind::Tdp)) => Err(format!(
                "{self:?} measures the shadow MMU: under TDP neither a CR3 switch (no prev_roots) nor a guest page-table store reaches the MMU"
            )),
            (Mmus::Both, Some(_)) => Err(match self {
                Benchmark::NestedFault => "--mmu has no effect on nested-fault: it measures both MMUs of a nested VM in one run (the TDP MMU for L1, the nested MMU for L2)".into(),
                Benchmark::TlbMiss => "--mmu has no effect on tlb-miss: it measures both MMUs, each phase named by its MMU".into(),
                _ => "--mmu has no effect on tlb-hit: it measures both MMUs, each phase named by its MMU".into(),
            }),
            (Mmus::Tdp | Mmus::None, Some(MmuKind::Shadow)) => Err(format!(
                "--mmu shadow: only populate, cr3-switch and wp-emulate measure the shadow MMU; {self:?} runs on the TDP MMU"
            )),
        }
    }

    /// Whether it runs on guest memory sized by the configuration's vCPUs
    /// and bytes per vCPU.
    pub fn sized(self) -> bool {
        matches!(
            self,
            Benchmark::Populate | Benchmark::DirtyLog | Benchmark::AccessTracking
        )
    }

    /// Whether it runs on guest memory with the configuration's backing.
    pub fn backed(self) -> bool {
        self.sized() || self == Benchmark::ZapAll
    }

    /// The most iterations it takes: beyond, a run would take hours, so a
    /// larger value is taken for a mistake.
    pub fn max_iterations(self) -> u64 {
        match self {
            Benchmark::Walk | Benchmark::TlbHit => 100_000_000,
            Benchmark::TlbMiss => 1_000_000,
            Benchmark::Cr3Switch | Benchmark::WpEmulate => 20_000_000,
            Benchmark::NestedFault => 100,
            Benchmark::Populate | Benchmark::DirtyLog | Benchmark::ZapAll | Benchmark::AccessTracking => 100,
        }
    }

    /// Runs it on `mmu` (see [`Benchmark::check_mmu`]) with `cfg` and
    /// `iterations` (its default when `None`), reporting progress.
    pub fn run(
        self,
        mmu: Option<MmuKind>,
        cfg: &TdpBenchConfig,
        iterations: Option<u64>,
        progress: &dyn Fn(&str),
    ) -> Result<Report, BenchError> {
        self.check_mmu(mmu).map_err(BenchError::Config)?;
        match self {
            Benchmark::Walk => Ok(crate::walk::run(iterations.unwrap_or(2_000_000)).into()),
            Benchmark::TlbHit => crate::tlb::run(iterations),
            Benchmark::TlbMiss => crate::tlb::miss::run(iterations),
            Benchmark::Populate if mmu == Some(MmuKind::Shadow) => crate::shadow::populate(cfg, progress),
            Benchmark::Populate => crate::tdp::populate(cfg, progress),
            Benchmark::DirtyLog => crate::tdp::dirty_log(cfg, progress),
            Benchmark::ZapAll => crate::tdp::zap_all(cfg, progress),
            Benchmark::AccessTracking => crate::tdp::access_tracking(cfg, progress),
            Benchmark::Cr3Switch => crate::shadow::cr3_switch(iterations),
            Benchmark::WpEmulate => crate::shadow::wp_emulate(iterations),
            Benchmark::NestedFault => crate::nested::run(iterations),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_with_an_mmu_runs_what_measures_it() {
        assert_eq!(
            Benchmark::on(MmuKind::Shadow),
            [Benchmark::Populate, Benchmark::Cr3Switch, Benchmark::WpEmulate]
        );
        assert_eq!(
            Benchmark::on(MmuKind::Tdp),
            [
                Benchmark::Populate,
                Benchmark::DirtyLog,
                Benchmark::ZapAll,
                Benchmark::AccessTracking
            ]
        );
        for b in Benchmark::ALL {
            for mmu in [MmuKind::Tdp, MmuKind::Shadow] {
                assert_eq!(
                    Benchmark::on(mmu).contains(&b),
                    b.check_mmu(Some(mmu)).is_ok() && !matches!(b.mmus(), Mmus::None | Mmus::Both),
                    "{b:?} on {mmu:?}"
                );
            }
        }
    }
}
