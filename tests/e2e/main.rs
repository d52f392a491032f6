//! End-to-end tests across crates, one binary (one link) for all of them: the real agent
//! on this kernel, the real server, real workloads, and perf and bpftrace as references.
//! Each test takes the host alone or shared ([`profiler_tests::host_alone`],
//! [`profiler_tests::host_shared`]), so tests that measure never overlap another test,
//! and tests that only wait on the wall clock overlap each other.
//! `cargo test -p profiler-tests --test e2e MODULE::` runs one module.

mod changes;
mod cli_errors;
mod daemon;
mod labels;
mod off_cpu;
mod on_cpu;
mod python;
mod schedule;
mod ship_faults;
mod unwind;
mod waits;
