//! `labels-app SECONDS [THREADS] [plain]`: serves two endpoints on the same threads for
//! SECONDS, each request labelled with custom labels while it runs: `endpoint`
//! (`checkout` or `search`, in turn) and a `request_id` unique to the request. Each
//! endpoint burns CPU in a function of its own, so a profiler that reads the labels puts
//! each function under its endpoint. `plain` does the same work with no label set (the
//! cost benchmark's baseline). Prints the requests served.

use std::time::{Duration, Instant};

#[inline(never)]
fn checkout_work(until: Instant) -> u64 {
    let mut x = 1u64;
    while Instant::now() < until {
        for _ in 0..1000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        }
    }
    std::hint::black_box(x)
}

#[inline(never)]
fn search_work(until: Instant) -> u64 {
    let mut x = 7u64;
    while Instant::now() < until {
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    std::hint::black_box(x)
}

fn serve(thread: usize, seconds: f64, labelled: bool) -> u64 {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut served = 0u64;
    while Instant::now() < end {
        let checkout = served % 2 == 0;
        let request_id = format!("{thread}-{served}");
        let endpoint = if checkout { "checkout" } else { "search" };
        let work = || {
            let until = Instant::now() + Duration::from_millis(3);
            if checkout {
                checkout_work(until)
            } else {
                search_work(until)
            }
        };
        if labelled {
            custom_labels::with_labels([("endpoint", endpoint), ("request_id", request_id.as_str())], work);
        } else {
            work();
        }
        served += 1;
    }
    served
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().and_then(|s| s.parse().ok()).expect("usage: labels-app SECONDS [THREADS]");
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let labelled = args.next().as_deref() != Some("plain");
    let handles: Vec<_> = (0..threads).map(|t| std::thread::spawn(move || serve(t, seconds, labelled))).collect();
    let served: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    println!("{served}");
}
