//! The agent's integration tests, one binary for all of them: the library's sessions
//! and programs on the real kernel (they load BPF programs: run as root).

mod off_cpu_faults;
