//! The simulator: what drives the MMUs the way a guest, a host and a VMM
//! do: a VM assembled from the layers ([`vm`], [`machine`]) with its
//! configuration ([`config`]), the guest OS model ([`guest`]), workloads,
//! `vmmu run` ([`run`]), the TDP stress scenario ([`stress`]) and the
//! live-migration checker over the dirty-logging matrix ([`migration`]).

pub mod checker;
pub mod config;
pub mod guest;
pub mod machine;
pub mod migration;
pub mod report;
pub mod run;
pub mod stress;
pub mod trace;
pub mod vm;
pub mod workload;
