//! What both MMUs share. Today: the SPTE format ([`spte`]) and the walk
//! cursor over SPTE tables in host frames ([`iter`]).

pub mod iter;
pub mod spte;
