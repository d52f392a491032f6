//! The server's integration tests, one binary (one link) for all of them: each module
//! is one concern, run against the real `profiler-server` binary or the library's
//! `Server` handle. `cargo test -p profiler-server --test it MODULE::` runs one module.

// Shared with the benches, which start the same ClickHouse stand-in.
#[path = "../chdb_bridge/mod.rs"]
mod chdb_bridge;
mod common;

mod amplification;
mod api;
mod auth;
mod bad_input;
mod changes;
mod clickhouse_backend;
mod crash;
mod durability;
mod events;
mod faults;
mod grafana;
mod otlp;
mod pyroscope_push;
mod query_limits;
mod query_suite;
mod requests;
mod roundtrip;
mod stacks_ingest;
mod waits;
