//! The simulator: what drives the MMUs the way a guest, a host and a VMM
//! do. Today a VM assembled from the layers ([`vm`]) and the TDP stress
//! scenario ([`stress`]); the guest OS model,
//! workloads and `vmmu run` grow here.

pub mod checker;
pub mod guest;
pub mod machine;
pub mod report;
pub mod run;
pub mod stress;
pub mod trace;
pub mod vm;
pub mod workload;
