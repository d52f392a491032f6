//! Library target so the agent can list this crate as a build-dependency and be rebuilt
//! when the BPF programs change; the programs themselves are the `profiler` binary.
#![no_std]
