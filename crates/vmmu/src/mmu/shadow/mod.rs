//! The shadow-paging MMU (KVM's shadow MMU, `mmu.c` and `paging_tmpl.h`):
//! shadow page tables built from the guest's own, write-protected guest
//! tables, unsync leaves, write emulation and the `prev_roots` cache.
//!
//! Built in steps; present so far: [`role`], the key of the page hash, and
//! [`access`], the rights of a leaf SPTE (with the CR0.WP = 0 emulation).

pub mod access;
pub mod role;
