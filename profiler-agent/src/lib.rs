//! The profiler agent as a library: one module per pipeline stage
//! (sample -> symbolize -> aggregate -> render), driven by [`record`].

pub mod aggregate;
pub mod classify;
pub mod config;
pub mod daemon;
pub mod elf_layout;
pub mod identity;
pub mod metrics;
pub mod perf_map;
pub mod privileges;
pub mod process;
pub mod record;
pub mod render;
pub mod runs;
pub mod sample;
pub mod session;
pub mod ship;
pub mod spool;
pub mod symbolize;
pub mod unwind;
