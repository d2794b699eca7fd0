//! The seed threads' design decisions as runtime policies of a VM
//! ([`Policies`]), and their names for a command line ([`POLICY_KNOBS`]:
//! `vmmu run --policy zap-request=reload-all`).

use crate::host::{HostAddressSpace, HostWalk};
use crate::mem::HostMappingUse;
use crate::mmu::ZapRequest;
use crate::mmu::shadow::role::PrevRootsMatch;
use crate::mmu::shadow::sync::{SyncRootsCheck, UnsyncLevels};
use crate::mmu::tdp::{HugeRecovery, TdpMmu, ZapAllFastOrder};
use crate::mmu::track::IndirectGate;

/// The design decisions of the seed threads that vmmu can run either way:
/// runtime policies of the real MMU code, each documented beside the code
/// it switches. The default is KVM's behaviour today. `vmmu experiment`
/// runs the variants side by side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Policies {
    /// Seed 001: how a cached root is matched to the context that wants
    /// it ([`PrevRootsMatch`]), on the shadow
    /// MMU and the nested MMU.
    pub prev_roots_match: PrevRootsMatch,
    /// Seed 002: how the TDP MMU's faults read the nested MMU's count of
    /// indirect shadow pages ([`crate::mmu::track::IndirectGate`]).
    pub indirect_gate: IndirectGate,
    /// Seed 002, for measuring: count the gate's false negatives (a
    /// tracked-set lookup on each fault the gate lets through).
    pub count_gate_misses: bool,
    /// Seed 000: what a sync of roots checks of a root
    /// ([`crate::mmu::shadow::sync::SyncRootsCheck`]).
    pub sync_roots_check: SyncRootsCheck,
    /// Seed 000: which shadow pages may go unsync
    /// ([`crate::mmu::shadow::sync::UnsyncLevels`]; `AnyLevel` is unsafe).
    pub unsync_levels: UnsyncLevels,
    /// Seed 003: what vCPUs drop when the MMU asks after a zap
    /// ([`crate::mmu::ZapRequest`]), on every MMU.
    pub zap_request: ZapRequest,
    /// Seed 003: how the TDP MMU's fast zap orders invalidation and request
    /// ([`crate::mmu::tdp::ZapAllFastOrder`]; `RequestYieldInvalidate` is
    /// unsafe).
    pub zap_all_fast_order: ZapAllFastOrder,
    /// Seed 004: whether faults consume a host mapping only after the
    /// retry check ([`crate::mem::HostMappingUse`]; `Unchecked` is unsafe),
    /// on every MMU.
    pub host_mapping_use: HostMappingUse,
    /// Seed 004: how the TDP MMU brings huge pages back after dirty
    /// logging ([`crate::mmu::tdp::HugeRecovery`]; `InPlaceNonLeaf` is
    /// unsafe).
    pub huge_recovery: HugeRecovery,
    /// Seed 004: how the host's lock-free walk reads its entries
    /// ([`crate::host::HostWalk`]; `ReRead` is unsafe).
    pub host_walk: HostWalk,
    /// Seed 004, for measuring: walks of the host checked and slowed
    /// ([`crate::host::HostAddressSpace::set_walk_policy`]).
    pub check_host_walks: bool,
}

impl Policies {
    /// Applies the TDP MMU's and the host's policies to a TDP VM's `mmu`
    /// over `host` (a [`Machine`](super::Machine) applies them all with
    /// [`Machine::set_policies`](super::Machine::set_policies)).
    pub fn apply_tdp(&self, mmu: &TdpMmu, host: &HostAddressSpace) {
        mmu.set_indirect_gate(self.indirect_gate, self.count_gate_misses);
        mmu.set_zap_request(self.zap_request, self.zap_all_fast_order);
        mmu.set_huge_recovery(self.huge_recovery);
        mmu.invalidate_state().set_host_mapping_use(self.host_mapping_use);
        host.set_walk_policy(self.host_walk, self.check_host_walks);
    }
}

/// A policy name or value the command line got wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not `name=value`.
    #[error("`{0}` is not name=value (e.g. zap-request=reload-all)")]
    Syntax(String),
    /// No policy of that name.
    #[error("no policy `{name}`; the policies are {known}")]
    UnknownPolicy {
        /// The name given.
        name: String,
        /// The names there are.
        known: String,
    },
    /// Not a value of that policy.
    #[error("`{value}` is not a value of policy `{name}`: {known}")]
    UnknownValue {
        /// The policy.
        name: &'static str,
        /// The value given.
        value: String,
        /// The values there are.
        known: String,
    },
}

/// One policy as a command line names it.
#[derive(Clone, Copy, Debug)]
pub struct PolicyKnob {
    /// Its name (`zap-request`).
    pub name: &'static str,
    /// The seed thread whose decision it is (`003`), or how it measures.
    pub seed: &'static str,
    /// Its values, the default (KVM's behaviour today) first.
    pub values: &'static [&'static str],
    /// The values that are unsafe: a correct MMU must not run with them,
    /// and the checker must catch a run that does.
    pub unsafe_values: &'static [&'static str],
    get: fn(&Policies) -> usize,
    set: fn(&mut Policies, usize),
}

impl PolicyKnob {
    /// The value `p` has.
    pub fn get(&self, p: &Policies) -> &'static str {
        self.values[(self.get)(p)]
    }
}

/// Every policy, in the order of the seeds.
pub const POLICY_KNOBS: [PolicyKnob; 11] = [
    PolicyKnob {
        name: "sync-roots-check",
        seed: "000",
        values: &["unsync-children", "unsync-or-unsync-children"],
        unsafe_values: &[],
        get: |p| (p.sync_roots_check == SyncRootsCheck::UnsyncOrUnsyncChildren) as usize,
        set: |p, i| p.sync_roots_check = [SyncRootsCheck::UnsyncChildren, SyncRootsCheck::UnsyncOrUnsyncChildren][i],
    },
    PolicyKnob {
        name: "unsync-levels",
        seed: "000",
        values: &["4k", "any"],
        unsafe_values: &["any"],
        get: |p| (p.unsync_levels == UnsyncLevels::AnyLevel) as usize,
        set: |p, i| p.unsync_levels = [UnsyncLevels::FourK, UnsyncLevels::AnyLevel][i],
    },
    PolicyKnob {
        name: "prev-roots-match",
        seed: "001",
        values: &["normalised", "unnormalised"],
        unsafe_values: &[],
        get: |p| (p.prev_roots_match == PrevRootsMatch::Unnormalised) as usize,
        set: |p, i| p.prev_roots_match = [PrevRootsMatch::Normalised, PrevRootsMatch::Unnormalised][i],
    },
    PolicyKnob {
        name: "indirect-gate",
        seed: "002",
        values: &["lockless", "under-mmu-lock"],
        unsafe_values: &[],
        get: |p| (p.indirect_gate == IndirectGate::UnderMmuLock) as usize,
        set: |p, i| p.indirect_gate = [IndirectGate::Lockless, IndirectGate::UnderMmuLock][i],
    },
    PolicyKnob {
        name: "count-gate-misses",
        seed: "002, measuring",
        values: &["off", "on"],
        unsafe_values: &[],
        get: |p| p.count_gate_misses as usize,
        set: |p, i| p.count_gate_misses = i == 1,
    },
    PolicyKnob {
        name: "zap-request",
        seed: "003",
        values: &["free-obsolete", "reload-all"],
        unsafe_values: &[],
        get: |p| (p.zap_request == ZapRequest::ReloadAll) as usize,
        set: |p, i| p.zap_request = [ZapRequest::FreeObsolete, ZapRequest::ReloadAll][i],
    },
    PolicyKnob {
        name: "zap-all-fast-order",
        seed: "003",
        values: &[
            "one-critical-section",
            "invalidate-yield-request",
            "request-yield-invalidate",
        ],
        unsafe_values: &["request-yield-invalidate"],
        get: |p| p.zap_all_fast_order as usize,
        set: |p, i| {
            p.zap_all_fast_order = [
                ZapAllFastOrder::OneCriticalSection,
                ZapAllFastOrder::InvalidateYieldRequest,
                ZapAllFastOrder::RequestYieldInvalidate,
            ][i]
        },
    },
    PolicyKnob {
        name: "host-mapping-use",
        seed: "004",
        values: &["retry-checked", "unchecked"],
        unsafe_values: &["unchecked"],
        get: |p| (p.host_mapping_use == HostMappingUse::Unchecked) as usize,
        set: |p, i| p.host_mapping_use = [HostMappingUse::RetryChecked, HostMappingUse::Unchecked][i],
    },
    PolicyKnob {
        name: "huge-recovery",
        seed: "004",
        values: &[
            "in-place-notifier-checked",
            "in-place-existing-leaf",
            "zap-collapsible",
            "in-place-non-leaf",
        ],
        unsafe_values: &["in-place-non-leaf"],
        get: |p| p.huge_recovery as usize,
        set: |p, i| {
            p.huge_recovery = [
                HugeRecovery::InPlaceNotifierChecked,
                HugeRecovery::InPlaceExistingLeaf,
                HugeRecovery::ZapCollapsible,
                HugeRecovery::InPlaceNonLeaf,
            ][i]
        },
    },
    PolicyKnob {
        name: "host-walk",
        seed: "004",
        values: &["read-once", "re-read"],
        unsafe_values: &["re-read"],
        get: |p| (p.host_walk == HostWalk::ReRead) as usize,
        set: |p, i| p.host_walk = [HostWalk::ReadOnce, HostWalk::ReRead][i],
    },
    PolicyKnob {
        name: "check-host-walks",
        seed: "004, measuring",
        values: &["off", "on"],
        unsafe_values: &[],
        get: |p| p.check_host_walks as usize,
        set: |p, i| p.check_host_walks = i == 1,
    },
];

impl Policies {
    /// Sets one policy from its `name=value` form (`zap-request=reload-all`).
    pub fn set_from_str(&mut self, assignment: &str) -> Result<(), PolicyError> {
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| PolicyError::Syntax(assignment.to_string()))?;
        let knob = POLICY_KNOBS
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| PolicyError::UnknownPolicy {
                name: name.to_string(),
                known: POLICY_KNOBS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "),
            })?;
        let i = knob
            .values
            .iter()
            .position(|v| *v == value)
            .ok_or_else(|| PolicyError::UnknownValue {
                name: knob.name,
                value: value.to_string(),
                known: knob.values.join(", "),
            })?;
        (knob.set)(self, i);
        Ok(())
    }

    /// The policies that are not the default, as `name=value` (what
    /// [`Policies::set_from_str`] takes back).
    pub fn assignments(&self) -> Vec<String> {
        let default = Policies::default();
        POLICY_KNOBS
            .iter()
            .filter(|k| k.get(self) != k.get(&default))
            .map(|k| format!("{}={}", k.name, k.get(self)))
            .collect()
    }

    /// The policies that are not the default, as `--policy name=value`
    /// flags (empty for the defaults).
    pub fn flags(&self) -> String {
        self.assignments()
            .iter()
            .map(|a| format!("--policy {a}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The policies set to an unsafe value, as `name=value`.
    pub fn unsafe_ones(&self) -> Vec<String> {
        POLICY_KNOBS
            .iter()
            .filter(|k| k.unsafe_values.contains(&k.get(self)))
            .map(|k| format!("{}={}", k.name, k.get(self)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of every knob sets what it names and reads back, and
    /// prints as the flag that sets it again; the default prints nothing.
    #[test]
    fn every_policy_value_round_trips() {
        assert_eq!(Policies::default().flags(), "");
        for k in &POLICY_KNOBS {
            assert_eq!(k.get(&Policies::default()), k.values[0], "{}", k.name);
            for (i, v) in k.values.iter().enumerate() {
                let mut p = Policies::default();
                p.set_from_str(&format!("{}={v}", k.name)).unwrap();
                assert_eq!(k.get(&p), *v);
                assert_eq!(p != Policies::default(), i > 0, "{}={v}", k.name);
                let mut again = Policies::default();
                for f in p.flags().split_whitespace().filter(|f| *f != "--policy") {
                    again.set_from_str(f).unwrap();
                }
                assert_eq!(again, p);
                assert_eq!(p.unsafe_ones().is_empty(), !k.unsafe_values.contains(v));
            }
        }
    }

    #[test]
    fn bad_policies_are_named() {
        let mut p = Policies::default();
        assert!(matches!(p.set_from_str("zap-request"), Err(PolicyError::Syntax(_))));
        assert!(matches!(
            p.set_from_str("frob=1"),
            Err(PolicyError::UnknownPolicy { .. })
        ));
        let e = p.set_from_str("zap-request=sometimes").unwrap_err();
        assert!(e.to_string().contains("free-obsolete, reload-all"), "{e}");
        assert_eq!(p, Policies::default(), "nothing set by a bad assignment");
    }
}
