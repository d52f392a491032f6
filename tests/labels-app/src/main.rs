//! `labels-app SECONDS [THREADS] [plain]`: serves two endpoints on the same threads for
//! SECONDS, each request labelled with custom labels while it runs: `endpoint`
//! (`checkout` or `search`, in turn) and a `request_id` unique to the request. Each
//! endpoint burns CPU in a function of its own, so a profiler that reads the labels puts
//! each function under its endpoint. `plain` does the same work with no label set (the
//! cost benchmark's baseline). Prints the requests served.
//!
//! `labels-app requests SECONDS [THREADS]`: a service whose requests wait (sleep)
//! 20 to 40 ms in `base_wait`, and every 80th 40 ms more in `slow_dependency`,
//! each labelled `endpoint=checkout` and a `request_id`. Prints, as JSON, the requests
//! served and the percentiles of their latency as the app measured it (nearest rank).
//! One request in 80, not 100: then the p99 falls among the slow requests rather than
//! on the 20 ms gap between the two groups, where a request more or less on either
//! side would move it by a third.

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

#[inline(never)]
fn base_wait(request: u64) {
    // 20 to 40 ms, spread by a hash of the request number.
    let spread = request.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 44;
    std::thread::sleep(Duration::from_micros(20_000 + spread % 20_000));
    // Not a tail call: the frame stays on the stack.
    std::hint::black_box(request);
}

#[inline(never)]
fn slow_dependency(request: u64) {
    std::thread::sleep(Duration::from_millis(40));
    std::hint::black_box(request);
}

fn serve_requests(seconds: f64, next: &std::sync::atomic::AtomicU64) -> Vec<Duration> {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut latencies = Vec::new();
    while Instant::now() < end {
        let request = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request_id = format!("req-{request}");
        let started = Instant::now();
        custom_labels::with_labels([("endpoint", "checkout"), ("request_id", request_id.as_str())], || {
            base_wait(request);
            if request % 80 == 79 {
                slow_dependency(request);
            }
        });
        latencies.push(started.elapsed());
    }
    latencies
}

/// The q-quantile by nearest rank (the server's definition), nanoseconds.
fn quantile(sorted: &[Duration], q: f64) -> u128 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_nanos()
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("requests") {
        args.next();
        let seconds: f64 = args.next().and_then(|s| s.parse().ok()).expect("usage: labels-app requests SECONDS [THREADS]");
        let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let next = next.clone();
                std::thread::spawn(move || serve_requests(seconds, &next))
            })
            .collect();
        let mut latencies: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        latencies.sort();
        let slow = next.load(std::sync::atomic::Ordering::Relaxed) / 80;
        println!(
            "{{\"served\":{},\"slow\":{slow},\"p50_ns\":{},\"p99_ns\":{},\"max_ns\":{}}}",
            latencies.len(),
            quantile(&latencies, 0.5),
            quantile(&latencies, 0.99),
            quantile(&latencies, 1.0)
        );
        return;
    }
    let seconds: f64 = args.next().and_then(|s| s.parse().ok()).expect("usage: labels-app SECONDS [THREADS]");
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let labelled = args.next().as_deref() != Some("plain");
    let handles: Vec<_> = (0..threads).map(|t| std::thread::spawn(move || serve(t, seconds, labelled))).collect();
    let served: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    println!("{served}");
}
