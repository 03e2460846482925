//! Integration tests: the real server on an ephemeral port, driven over HTTP.

mod helpers;

// The `probe` fixture module registers itself only if its crate is linked.
use trellis_tests as _;

mod accounts;
mod auth;
mod bi;
mod cache;
mod cluster;
mod common;
mod connections;
mod durability;
mod errors;
mod faults;
mod housekeeping;
mod instances;
mod middleware;
mod openapi;
mod process;
mod proxies;
mod publications;
mod security;
mod security_edge;
mod sqs;
mod storage;
mod traces;
