//! Sampled test data: what an agent sends for one window of a request-serving
//! service, with the noise of sampling at 99 Hz on two cores.

pub const SAMPLE_NS: i64 = 10_101_010; // 99 Hz
pub const SAMPLES: usize = 2_000;

// The benches' helpers: only their Rng is used here.
#[path = "../../../benches/common/mod.rs"]
#[allow(dead_code)]
mod rng;

pub use rng::Rng;

/// Uniform in [0, 1).
pub fn unit(rng: &mut Rng) -> f64 {
    (rng.next() >> 11) as f64 / (1u64 << 53) as f64
}

/// How one window of the workload behaves.
#[derive(Clone, Copy)]
pub struct Workload {
    /// Share of CPU moved from `serve;render` into `serve;parse;hot_loop`.
    pub shifted: f64,
    /// Blocked-io per request, ms (10 requests per second).
    pub io_ms: f64,
}

pub const STEADY: Workload = Workload { shifted: 0.0, io_ms: 30.0 };

/// (on-CPU folded text, off-CPU folded text: blocked-io line then sleep line).
pub fn window(rng: &mut Rng, w: Workload) -> (String, String) {
    let stacks = [
        ("main;serve;parse;tokenize", 0.20),
        ("main;serve;parse;hot_loop", 0.10 + w.shifted),
        ("main;serve;render", 0.25 - w.shifted),
        ("main;serve;db;encode", 0.15),
        ("main;gc;mark", 0.12),
        ("main;gc;sweep", 0.08),
        ("main;log;format", 0.10),
    ];
    let mut counts = vec![0i64; stacks.len()];
    for _ in 0..SAMPLES {
        let mut x = unit(rng);
        let i = stacks.iter().position(|(_, p)| {
            x -= p;
            x < 0.0
        });
        counts[i.unwrap_or(stacks.len() - 1)] += 1;
    }
    let on: String = stacks
        .iter()
        .zip(&counts)
        .map(|((s, _), c)| format!("{s} {}\n", c * SAMPLE_NS))
        .collect();
    // 10 requests per second, each blocked for about io_ms (±50%), plus
    // sleeping workers whose count wanders.
    let io: f64 = (0..100).map(|_| w.io_ms * (0.5 + unit(rng))).sum::<f64>() * 1e6;
    let sleep = (4.0 + 2.0 * unit(rng)) * 10e9;
    let off = format!("main;serve;db;read {}\nmain;worker;nanosleep {}\n", io as i64, sleep as i64);
    (on, off)
}

