//! The simulator: what drives the vmmu engine the way a guest, a host and
//! a VMM do, over a VM from `vmmu::vm`: the guest OS model ([`guest`]),
//! workloads ([`workload`]) and configurations drawn at random
//! ([`config`]), `vmmu run` ([`run`]) with its checker ([`checker`]),
//! traces ([`trace`]) and reports ([`report`]), the TDP stress scenario
//! ([`stress`]), the live-migration checker over the dirty-logging matrix
//! ([`migration`]), and the replay of recorded x86 paging conformance
//! cases ([`conform`]).

#![warn(missing_docs)]

pub mod checker;
pub mod config;
pub mod conform;
pub mod experiment;
pub mod guest;
pub mod migration;
pub mod nested;
pub mod report;
pub mod run;
pub mod stress;
pub mod trace;
pub mod workload;
