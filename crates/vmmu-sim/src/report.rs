//! What a simulator run reports: one [`MmuRunReport`] per MMU, rendered
//! as a table, as JSON, or as a report directory with plots.

use serde::Serialize;

use vmmu::mmu::stats::MmuStatsSnapshot;

/// One point of a run's timeline (sampled about every 50 ms).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    /// Guest accesses made so far.
    pub accesses: u64,
    /// MMU faults taken so far (`pf_taken`).
    pub faults: u64,
    /// Bytes of MMU page-table memory now.
    pub mmu_bytes: u64,
}

/// Live-migration figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationReport {
    /// Migrations done (each ends in a byte-for-byte comparison).
    pub migrations: u64,
    /// Copy rounds while the vCPUs ran (the first copies everything).
    pub rounds: u64,
    /// Pages copied while the vCPUs ran.
    pub pages_copied: u64,
    /// Pages copied with the vCPUs stopped (the downtime's work).
    pub downtime_pages: u64,
    /// Bytes compared between destination and source at the end.
    pub bytes_compared: u64,
    /// Pages whose destination copy differed from the source.
    pub mismatched_pages: u64,
}

/// A histogram of fault latencies: `counts[i]` faults took less than
/// `bounds_ns[i]` nanoseconds and at least the previous bound.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyHistogram {
    /// Upper bounds of the buckets, in nanoseconds, increasing.
    pub bounds_ns: Vec<u64>,
    /// Faults per bucket.
    pub counts: Vec<u64>,
}

/// What one MMU's run did and found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MmuRunReport {
    /// `"shadow"` or `"tdp"`.
    pub mmu: String,
    /// The workload's name.
    pub workload: String,
    /// The guest paging mode (`"32-bit"`, `"pae"`, `"4-level"`, `"5-level"`).
    pub paging: String,
    /// The VM's configuration, as the `vmmu run` flags that set it.
    pub config: String,
    /// vCPU threads.
    pub vcpus: u64,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Guest operations done (touch, mmap, fork, …).
    pub operations: u64,
    /// Guest memory accesses made by the vCPUs (user and kernel).
    pub accesses: u64,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// `accesses / seconds`.
    pub accesses_per_sec: f64,
    /// Accesses served by a TLB hit.
    pub tlb_hits: u64,
    /// Hardware page walks of the TLB misses.
    pub walks: u64,
    /// Memory references of those walks (both dimensions under TDP).
    pub walk_refs: u64,
    /// Exits to the MMU (EPT violations and misconfigurations, or shadow
    /// page faults).
    pub exits: u64,
    /// Exceptions the guest took (#PF of demand paging and COW).
    pub guest_faults: u64,
    /// TLB flushes the guest made (INVLPG, CR3 loads that flush, INVPCID)
    /// plus shootdowns it sent.
    pub guest_tlb_flushes: u64,
    /// Shootdowns the guest sent to other vCPUs.
    pub shootdowns: u64,
    /// Processes created (boot and fork).
    pub processes: u64,
    /// Shadow pages now (0 on the TDP MMU).
    pub shadow_pages: u64,
    /// Unsync shadow pages now.
    pub unsync_pages: u64,
    /// `prev_roots_hit / (prev_roots_hit + prev_roots_miss)`, or 0.
    pub prev_roots_hit_rate: f64,
    /// The MMU's page-table memory at the end, in bytes.
    pub mmu_memory_bytes: u64,
    /// The most MMU page-table memory seen, in bytes.
    pub mmu_memory_peak_bytes: u64,
    /// The page-table memory the MMU may hold ([`Machine::mmu_limit_bytes`](
    /// vmmu::vm::Machine::mmu_limit_bytes)); a peak above it is
    /// a violation.
    pub mmu_memory_limit_bytes: u64,
    /// Adversarial guest operations done.
    pub adversarial_ops: u64,
    /// MMU-notifier invalidations the host delivered.
    pub notifier_events: u64,
    /// Host churn operations attempted.
    pub host_operations: u64,
    /// MMU audits run (every SPTE checked against memslots and host).
    pub audits: u64,
    /// Current roots the vCPUs dropped and reloaded on the MMU's request
    /// after a zap (seed 003).
    pub root_reloads: u64,
    /// Cached roots (`prev_roots`) the vCPUs dropped on such a request.
    pub cached_roots_dropped: u64,
    /// Zaps of everything the VMM made (under `--host-churn`).
    pub zaps: u64,
    /// Their median latency for the caller, in microseconds.
    pub zap_p50_us: f64,
    /// Their longest, in microseconds.
    pub zap_max_us: f64,
    /// The MMU's counters, named as KVM's.
    pub stats: MmuStatsSnapshot,
    /// Live migration, when one ran.
    pub migration: Option<MigrationReport>,
    /// Checker violations found.
    pub violations: u64,
    /// The first violations, described.
    pub violation_details: Vec<String>,
    /// The run's timeline.
    pub timeline: Vec<Sample>,
    /// Sampled latencies of accesses that exited to the MMU.
    pub fault_latency: LatencyHistogram,
    /// Under `--nested`: the L1 hypervisor and the nested MMU.
    pub nested: Option<NestedRunReport>,
}

/// What the L1 hypervisor and the nested MMU did in a `--nested` run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NestedRunReport {
    /// `"intel"` (EPT12 shadowed by EPT02) or `"amd"` (NPT12 by NPT02).
    pub vendor: String,
    /// L2 VMs.
    pub vms: u64,
    /// Memory of each, in bytes.
    pub vm_memory: u64,
    /// Exits to L1 it handled by mapping memory.
    pub l1_exits: u64,
    /// Leaves L1 wrote into its nested tables.
    pub l1_mapped: u64,
    /// Leaves L1 cleared when taking memory back.
    pub l1_unmapped: u64,
    /// Switches of a vCPU from one L2 VM to another.
    pub switches: u64,
    /// Invalidations L1 ran on its vCPUs after taking memory back
    /// (INVEPT, flushing VMRUNs).
    pub invalidations: u64,
    /// `prev_roots` hits / (hits + misses) of the nested MMU: how often a
    /// switch found the shadow of the next VM's tables cached (seed 001).
    pub prev_roots_hit_rate: f64,
    /// The nested MMU's counters, named as KVM's.
    pub stats: MmuStatsSnapshot,
}
