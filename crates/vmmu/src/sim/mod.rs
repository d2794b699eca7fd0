//! The simulator: what drives the MMUs the way a guest, a host and a VMM
//! do. Today a VM assembled from the layers ([`vm`]) and the TDP stress
//! scenario ([`stress`]); the guest OS model,
//! workloads and `vmmu run` grow here.

pub mod stress;
pub mod vm;
