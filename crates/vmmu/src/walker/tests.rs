//! Walker tests.
