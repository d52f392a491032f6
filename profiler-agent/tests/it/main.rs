//! The agent's integration tests, one binary for all of them: the library's sessions
//! and programs on the real kernel (they load BPF programs: run as root).

use std::sync::Mutex;

mod off_cpu_faults;
mod off_cpu_windows;

/// One sampler at a time: each test traces this same process.
static SERIAL: Mutex<()> = Mutex::new(());
