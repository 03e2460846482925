//! Test support for Trellis: the `probe` fixture module, a module that lives outside
//! `modules/` and plugs in through the same contract as the real ones. It gives the
//! integration tests endpoints that are slow, panic, validate input, use the bus and
//! report readiness from configuration.

pub mod probe;
