//! What both MMUs share. Today: the SPTE format ([`spte`]).

pub mod spte;
