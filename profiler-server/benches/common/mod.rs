//! Helpers the server benches share.

/// A server on loopback (port 0) keeping its data in `dir`.
pub fn server_config(dir: &std::path::Path) -> profiler_server::config::Config {
    profiler_server::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        ..Default::default()
    }
}

/// xorshift64: deterministic data, the same on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
