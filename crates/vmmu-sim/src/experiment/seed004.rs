//! Seed 004 (the rules for `host_pfn_mapping_level`): the level of a host
//! mapping may change at any moment (a THP collapse or split, a
//! migration), so KVM may consume it only (1) after the MMU-notifier retry
//! check, (2) under `mmu_lock` with no invalidation of the hva in
//! progress (checked, or implied by an existing leaf SPTE), or (3) only to
//! decide a zap. The walk itself must read each host entry once.
//!
//! One stress, run under each variant: a TDP VM whose memory is backed by
//! THP; vCPUs write and read back their own pages through the MMU; the
//! host collapses, splits and migrates the 2 MiB blocks under them; the
//! VMM turns dirty logging on and off, so that every "off" brings huge
//! pages back (in place, or by zapping for faults to map huge). The
//! checker: each value a vCPU reads is the one it last wrote, no access
//! reaches a freed frame, the MMU's audit after every "off" finds no SPTE
//! stale or larger than the host mapping, and every checked host walk
//! stays on page tables.
//!
//! Variants: the three safe ways of the comment ([`HugeRecovery`] in place
//! by the notifier check or by an existing leaf, or zap-and-refault with
//! faults under the retry check), and three unsafe ones: faults consuming
//! the host mapping without the retry check ([`HostMappingUse::Unchecked`]),
//! in-place promotion where only a non-leaf SPTE was checked, and a host
//! walk that re-reads its entries ([`HostWalk::ReRead`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use vmmu::addr::{Gpa, Gva, Hva};
use vmmu::arch::control::{CpuFeatures, Vendor};
use vmmu::arch::perm::{Access, AccessKind};
use vmmu::cpu::vcpu::AccessResult;
use vmmu::host::{HostWalk, VmaFlags};
use vmmu::mem::{HostMappingUse, MemslotFlags};
use vmmu::mmu::tdp::{HugeRecovery, TdpConfig};
use vmmu::vm::{Policies, Vm};
use vmmu::walker::ControlRegs;

use super::{ExperimentConfig, ExperimentResult, VariantResult, metric};

const MB: u64 = 1 << 20;
/// 2 MiB blocks of guest memory (few, so the host's changes keep landing
/// where the vCPUs and the recovery are).
pub const BLOCKS: u64 = 8;
/// vCPU threads.
pub const VCPUS: u64 = 2;
/// Where the guest memory is mapped in the host (2 MiB aligned).
const HVA: u64 = 0x4000_0000;
/// Violations described per variant.
const DETAILS: usize = 3;
/// The host's pace: one change tried per this long, the same in every
/// variant (unpaced, how much the host gets done depends on how the
/// variant's locks let it run).
const HOST_PACE: Duration = Duration::from_micros(20);
/// Stress runs of each variant, interleaved (the counts are summed).
const ROUNDS: u64 = 2;

/// What one stress run came to.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The checker's violations.
    pub violations: u64,
    /// The first ones, described.
    pub details: Vec<String>,
    /// Times dirty logging was turned off (each one a recovery).
    pub recoveries: u64,
    /// Median time of turning logging off (the recovery), microseconds.
    pub recovery_p50_us: f64,
    /// Huge SPTEs recovered in place.
    pub recovered_in_place: i64,
    /// Tables zapped for faults to map huge again.
    pub zapped_collapsible: i64,
    /// 2 MiB SPTEs at the end.
    pub huge_at_end: i64,
    /// Faults taken.
    pub faults: i64,
    /// Faults retried (the retry protocol, lost races).
    pub retries: i64,
    /// vCPU accesses made.
    pub accesses: u64,
    /// Host changes made (collapses, splits, migrations).
    pub host_changes: u64,
    /// Checked host walks that went astray.
    pub walks_astray: u64,
    /// Seconds the stress ran (less than asked when a violation stopped
    /// it).
    pub seconds: f64,
}

impl Outcome {
    /// `self` and `o` together (rates weighted by their seconds).
    fn merge(self, o: Outcome) -> Outcome {
        let mut details = self.details;
        details.extend(o.details);
        details.truncate(DETAILS);
        let s = (self.seconds + o.seconds).max(1e-9);
        Outcome {
            violations: self.violations + o.violations,
            details,
            recoveries: self.recoveries + o.recoveries,
            recovery_p50_us: (self.recovery_p50_us * self.seconds + o.recovery_p50_us * o.seconds) / s,
            recovered_in_place: self.recovered_in_place + o.recovered_in_place,
            zapped_collapsible: self.zapped_collapsible + o.zapped_collapsible,
            huge_at_end: self.huge_at_end + o.huge_at_end,
            faults: self.faults + o.faults,
            retries: self.retries + o.retries,
            accesses: self.accesses + o.accesses,
            host_changes: self.host_changes + o.host_changes,
            walks_astray: self.walks_astray + o.walks_astray,
            seconds: self.seconds + o.seconds,
        }
    }
}

/// The checker's record, shared by the threads. The first violation
/// stops the stress: past a stale mapping, the guest may write into a
/// frame the host has reused (as a page table, even), and a host whose
/// memory is corrupt has nothing more to say, as a kernel would oops.
struct Findings {
    count: AtomicU64,
    details: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Findings {
    fn record(&self, n: u64, what: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        self.stop.store(true, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        let mut d = self.details.lock();
        if d.len() < DETAILS {
            d.push(what());
        }
    }
}

/// Runs the stress for `seconds` under `policies`.
pub fn stress(policies: Policies, seconds: f64, seed: u64) -> Result<Outcome, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let ram = BLOCKS * 2 * MB;
    let config = TdpConfig {
        vendor: Vendor::Intel,
        max_level: 2,
        eager_page_split: true,
        ..TdpConfig::default()
    };
    let vm = Vm::new(ram, Hva::new(HVA), VmaFlags::WRITE | VmaFlags::THP, config).map_err(|x| e(&x))?;
    policies.apply_tdp(&vm.mmu, &vm.host);
    // Every page starts with a value of its own, never 0 and never the
    // poison of a freed frame: a read through a stale mapping (a freed
    // frame, or one reused, zeroed, as a table) cannot match, and the
    // vCPU stops before its write could land there.
    let initial = |gpa: u64| (gpa << 16) | 0xa5;
    let mem = vm.memory();
    for off in (0..ram).step_by(4096) {
        mem.write_value(Gpa::new(off), 8, initial(off)).map_err(|x| e(&x))?;
    }
    let found = Findings {
        count: AtomicU64::new(0),
        details: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    };
    let stop = &found.stop;
    let accesses = AtomicU64::new(0);
    let host_changes = AtomicU64::new(0);
    let mut off_ns = Vec::new();
    let before = vm.mmu.stats().snapshot();
    let host_before = vm.host.stats();
    let mut vcpus = Vec::new();
    for t in 0..VCPUS {
        vcpus.push(
            vm.vcpu(CpuFeatures::default(), 1 + t as u16, ControlRegs::default(), 0)
                .map_err(|x| e(&x))?,
        );
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    std::thread::scope(|s| {
        for (t, mut v) in vcpus.into_iter().enumerate() {
            let (found, accesses) = (&found, &accesses);
            s.spawn(move || {
                // The vCPU's own pages (every VCPUS-th), and what it last
                // wrote to each.
                let pages: Vec<u64> = (0..ram / 4096).filter(|p| p % VCPUS == t as u64).collect();
                let mut last: Vec<u64> = pages.iter().map(|p| initial(p * 4096)).collect();
                let mut rng = SmallRng::seed_from_u64(seed ^ (t as u64 + 1));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.random_range(0..pages.len());
                    let gva = Gva::new(pages[i] * 4096);
                    let read = v.access(gva, Access::new(AccessKind::Read, 0, false), 8, 0);
                    match read {
                        Ok(AccessResult::Done { value, .. }) if value == last[i] => {}
                        Ok(AccessResult::Done { value, .. }) => {
                            found.record(1, || {
                                format!(
                                    "vCPU {t} read {value:#x} at gpa {:#x}, where it last wrote {:#x}: a stale mapping",
                                    gva.raw(),
                                    last[i]
                                )
                            });
                            break;
                        }
                        other => {
                            found.record(1, || format!("vCPU {t}: a read at gpa {:#x} gave {other:?}", gva.raw()));
                            return;
                        }
                    }
                    n += 1;
                    let value = (gva.raw() << 16) | (n & 0xffff) | 0x100;
                    match v.access(gva, Access::new(AccessKind::Write, 0, false), 8, value) {
                        Ok(AccessResult::Done { .. }) => last[i] = value,
                        other => {
                            found.record(1, || {
                                format!("vCPU {t}: a write at gpa {:#x} gave {other:?}", gva.raw())
                            });
                            return;
                        }
                    }
                    accesses.fetch_add(2, Ordering::Relaxed);
                    if v.stats().freed_frame_accesses > 0 {
                        break;
                    }
                }
                let freed = v.stats().freed_frame_accesses;
                found.record(freed, || {
                    format!("vCPU {t}: {freed} access(es) reached a frame the host had freed")
                });
            });
        }
        // The host: khugepaged, THP splits, compaction.
        {
            let (vm, host_changes) = (&vm, &host_changes);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ 0x4057);
                while !stop.load(Ordering::Relaxed) {
                    let block = rng.random_range(0..BLOCKS);
                    let base = Hva::new(HVA + block * 2 * MB);
                    let done = match rng.random_range(0..4) {
                        0 => vm.host.collapse_thp(base).is_ok(),
                        1 => vm.host.split_thp(base).is_ok(),
                        _ => vm
                            .host
                            .migrate(Hva::new(base.raw() + rng.random_range(0..512) * 4096))
                            .is_ok(),
                    };
                    if done {
                        host_changes.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(HOST_PACE);
                }
            });
        }
        // The VMM: dirty logging on, then off (the recovery), then the
        // audit, until the deadline.
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            if let Err(x) = vm.slots.update_flags(0, 0, MemslotFlags::LOG_DIRTY_PAGES) {
                found.record(1, || format!("turning dirty logging on: {x}"));
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
            let t0 = Instant::now();
            if let Err(x) = vm.slots.update_flags(0, 0, MemslotFlags::empty()) {
                found.record(1, || format!("turning dirty logging off: {x}"));
                break;
            }
            off_ns.push(t0.elapsed().as_nanos() as u64);
            let audit = vm.mmu.audit();
            found.record(audit.len() as u64, || {
                format!("MMU audit after a recovery: {}", audit[0])
            });
            std::thread::sleep(Duration::from_micros(200));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed().as_secs_f64();
    let after = vm.mmu.stats().snapshot();
    let host_after = vm.host.stats();
    let astray = host_after.walks_astray - host_before.walks_astray;
    found.record(astray, || {
        format!("{astray} host walk(s) read a frame as a page table that was none, or returned a page table as a leaf's frame")
    });
    off_ns.sort_unstable();
    Ok(Outcome {
        violations: found.count.load(Ordering::Relaxed),
        details: found.details.into_inner(),
        recoveries: off_ns.len() as u64,
        recovery_p50_us: off_ns.get(off_ns.len() / 2).map_or(0.0, |&n| n as f64 / 1e3),
        recovered_in_place: after.huge_pages_recovered - before.huge_pages_recovered,
        zapped_collapsible: after.huge_pages_zapped_collapsible - before.huge_pages_zapped_collapsible,
        huge_at_end: after.pages_2m,
        faults: after.pf_taken - before.pf_taken,
        retries: after.pf_retry - before.pf_retry,
        accesses: accesses.load(Ordering::Relaxed),
        host_changes: host_changes.load(Ordering::Relaxed),
        walks_astray: astray,
        seconds: elapsed,
    })
}

/// Runs the experiment.
pub fn run(cfg: &ExperimentConfig) -> Result<ExperimentResult, String> {
    let base = Policies {
        check_host_walks: true,
        ..Policies::default()
    };
    let variants_of: [(&'static str, &'static str, bool, Policies); 6] = [
        (
            "in place, notifier checked",
            "rule 2: under mmu_lock, promoted where no invalidation of the hva is in progress (vmmu's default)",
            true,
            base,
        ),
        (
            "in place, existing leaf",
            "rule 2: under mmu_lock, promoted where a leaf SPTE maps the region (the comment's in-place promotion)",
            true,
            Policies {
                huge_recovery: HugeRecovery::InPlaceExistingLeaf,
                ..base
            },
        ),
        (
            "zap, refault",
            "rule 3 then rule 1: tables the host level allows as huge are zapped; faults map huge under the retry check",
            true,
            Policies {
                huge_recovery: HugeRecovery::ZapCollapsible,
                ..base
            },
        ),
        (
            "fault without the retry check",
            "faults install the host frame and level they looked up even when an invalidation ran or runs",
            false,
            Policies {
                host_mapping_use: HostMappingUse::Unchecked,
                ..base
            },
        ),
        (
            "in place, non-leaf checked",
            "promoted wherever a table SPTE is present, with no notifier check",
            false,
            Policies {
                huge_recovery: HugeRecovery::InPlaceNonLeaf,
                ..base
            },
        ),
        (
            "re-reading host walk",
            "the host walk reads an entry again for each use; faults keep the retry check",
            false,
            Policies {
                host_walk: HostWalk::ReRead,
                ..base
            },
        ),
    ];
    // ROUNDS runs of each variant, interleaved, that make cfg.seconds.
    let seconds = (cfg.seconds / ROUNDS as f64).max(0.2);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; variants_of.len()];
    for round in 0..ROUNDS {
        for (i, (_, _, _, policies)) in variants_of.iter().enumerate() {
            let o = stress(*policies, seconds, cfg.seed + round)?;
            outcomes[i] = Some(match outcomes[i].take() {
                Some(prev) => prev.merge(o),
                None => o,
            });
        }
    }
    let mut variants = Vec::new();
    for ((name, what, safe, _), o) in variants_of.into_iter().zip(outcomes) {
        let o = o.expect("every variant ran");
        let secs = o.seconds.max(1e-9);
        variants.push(VariantResult {
            name,
            what,
            safe,
            runs: ROUNDS,
            violations: o.violations,
            details: o.details.clone(),
            metrics: vec![
                metric("recoveries (logging turned off)", "runs", o.recoveries as f64),
                metric("recovery time p50", "us", o.recovery_p50_us),
                metric("huge SPTEs recovered in place", "SPTEs", o.recovered_in_place as f64),
                metric("tables zapped to refault huge", "tables", o.zapped_collapsible as f64),
                metric("2M SPTEs at the end", "SPTEs", o.huge_at_end as f64),
                metric("faults per second", "faults/s", o.faults as f64 / secs),
                metric("faults retried", "faults", o.retries as f64),
                metric("host changes", "changes", o.host_changes as f64),
                metric("host walks astray", "walks", o.walks_astray as f64),
                metric("accesses per second", "accesses/s", o.accesses as f64 / secs),
            ],
        });
    }
    let get = |v: &VariantResult, m: &str| v.metric(m).unwrap_or(0.0);
    let (nc, el, zr) = (&variants[0], &variants[1], &variants[2]);
    let first = |v: &VariantResult| {
        v.details
            .first()
            .map_or("nothing".to_string(), |d| d.chars().take(180).collect())
    };
    let verdict = format!(
        "Under the same churn ({:.0}, {:.0} and {:.0} host changes), the three safe ways gave no violation ({}, {}, {}): in place with the notifier checked, {:.0} huge SPTEs came back over {:.0} recoveries (p50 {:.0} us each); in place where a leaf SPTE exists, {:.0} over {:.0} (p50 {:.0} us): the existing leaf is as good a witness as the notifier state; zapping for faults to map huge, {:.0} tables zapped (p50 {:.0} us) and {:.0} faults/s against {:.0} and {:.0}. Faults retried: {:.0}, {:.0}, {:.0}. The unsafe ones were caught: without the retry check {} violation(s) (first: {}); promoting where only a table SPTE was checked, {} (first: {}); the re-reading host walk went astray {:.0} times ({} violation(s); first: {}){}.",
        get(nc, "host changes"),
        get(el, "host changes"),
        get(zr, "host changes"),
        nc.violations,
        el.violations,
        zr.violations,
        get(nc, "huge SPTEs recovered in place"),
        get(nc, "recoveries (logging turned off)"),
        get(nc, "recovery time p50"),
        get(el, "huge SPTEs recovered in place"),
        get(el, "recoveries (logging turned off)"),
        get(el, "recovery time p50"),
        get(zr, "tables zapped to refault huge"),
        get(zr, "recovery time p50"),
        get(zr, "faults per second"),
        get(nc, "faults per second"),
        get(el, "faults per second"),
        get(nc, "faults retried"),
        get(el, "faults retried"),
        get(zr, "faults retried"),
        variants[3].violations,
        first(&variants[3]),
        variants[4].violations,
        first(&variants[4]),
        get(&variants[5], "host walks astray"),
        variants[5].violations,
        first(&variants[5]),
        if variants[5].violations as f64 == get(&variants[5], "host walks astray") {
            ", and that was all: no stale mapping, no audit finding, as the comment's note says (the retry check keeps what a racing walk returns from being consumed; reading each entry once keeps the walk itself on page tables)"
        } else {
            ""
        },
    );
    Ok(ExperimentResult {
        seed: "004",
        title: "the rules for host_pfn_mapping_level: when the host level may be consumed",
        question: "The host's mapping level of a guest page changes whenever the host collapses, splits or migrates a huge page. The patch writes down when KVM may use it: after the MMU-notifier retry check; under mmu_lock with no invalidation of the hva in progress (checked, or known from an existing valid mapping); or only to decide a zap. It warns that an in-place promotion would be safe with an existing leaf SPTE but not with a non-leaf one, and that the walk must read each host entry once, or a promotion during the walk sends it into the weeds.",
        variants,
        plot_metric: "huge SPTEs recovered in place",
        verdict,
    })
}
