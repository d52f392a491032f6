//! The profiler agent as a library: one module per pipeline stage
//! (sample -> symbolize -> aggregate), driven by [`record`]; folded text and
//! SVG come from `profiler_pprof`, which the server renders with too.
//! [`compare`] is the CI gate over two recorded profiles.

pub mod aggregate;
pub mod classify;
pub mod compare;
pub mod config;
pub mod cost;
pub mod daemon;
pub mod elf_layout;
pub mod identity;
pub mod kernel_btf;
pub mod labels;
pub mod mapped_files;
pub mod metrics;
pub mod perf_map;
pub mod privileges;
pub mod process;
pub mod python;
pub mod record;
pub mod runs;
pub mod sample;
pub mod session;
pub mod ship;
pub mod spool;
pub mod symbolize;
pub mod thread_context;
pub mod unwind;
