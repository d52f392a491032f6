//! Wait-duration histograms: how long each individual off-CPU wait of a stack
//! lasted, so that a stack's p50/p95/p99 can be told apart from its total.
//!
//! Buckets are logarithmic (the DDSketch mapping): bucket `i` holds the
//! durations in (γ^(i-1), γ^i] nanoseconds with γ = [`GAMMA`], and a bucket
//! stands for `2γ^i / (γ + 1)`, within [`RELATIVE_ERROR`] (4.8%) of any
//! duration it holds. Histograms merge by adding counts bucket by bucket, so
//! windows, series and stacks merge in any order and downsampling keeps them.
//!
//! Counts are weighted: the agent records a switch-out with probability p and
//! weighs it 1/p, so percentiles stay unbiased. A count is in units of
//! 1/[`ONE`] wait (the kernel's Q16 weights), an exact integer sum.
//!
//! A hand-written sketch rather than the `sketches-ddsketch` crate: that one
//! adds unweighted values only, and its buckets are private, while ours travel
//! in the agent's bundle, become the server's rows (bucket index in a stack
//! id's low bits, see [`row_id`]) and come back as `{le_ns, count}` lists.

use std::collections::BTreeMap;

/// Growth factor of bucket bounds.
pub const GAMMA: f64 = 1.1;
/// Largest relative error of a bucket's representative value.
pub const RELATIVE_ERROR: f64 = (GAMMA - 1.0) / (GAMMA + 1.0);
/// Bits of a row's stack id that hold the bucket index (see [`row_id`]).
pub const BUCKET_BITS: u32 = 10;
/// Bucket indexes there are room for: the longest duration a u64 holds falls in
/// bucket 466.
pub const BUCKETS: u16 = 1 << BUCKET_BITS;
/// A count of one unweighted wait.
pub const ONE: u64 = 1 << 16;

/// Prefix of the kind that holds the wait histograms of an off-CPU kind:
/// `waits:off-cpu:sleep` for `off-cpu:sleep`. Such kinds are never part of a
/// profile's totals; the server keeps them apart (see [`is_waits_kind`]).
pub const KIND_PREFIX: &str = "waits:";

/// The histograms' kind of a profile kind.
pub fn waits_kind(kind: &str) -> String {
    format!("{KIND_PREFIX}{kind}")
}

/// Whether a kind holds wait histograms rather than profile values.
pub fn is_waits_kind(kind: &str) -> bool {
    kind.starts_with(KIND_PREFIX)
}

/// The profile kind whose waits a histograms' kind holds.
pub fn profile_kind(waits_kind: &str) -> Option<&str> {
    waits_kind.strip_prefix(KIND_PREFIX)
}

/// The bucket of a duration in nanoseconds (0 for 0 and 1 ns).
pub fn bucket_of(ns: u64) -> u16 {
    if ns <= 1 {
        return 0;
    }
    let i = ((ns as f64).ln() / GAMMA.ln()).ceil();
    // ceil(log) can land one too low or high for exact powers: fix with the bounds.
    let mut i = (i.max(0.0) as u64).min(BUCKETS as u64 - 1) as u16;
    while i > 0 && upper_ns(i - 1) >= ns {
        i -= 1;
    }
    while i < BUCKETS - 1 && upper_ns(i) < ns {
        i += 1;
    }
    i
}

/// The largest duration bucket `i` holds (γ^i, rounded down).
pub fn upper_ns(i: u16) -> u64 {
    GAMMA.powi(i as i32).floor() as u64
}

/// The duration bucket `i` stands for.
pub fn representative_ns(i: u16) -> u64 {
    if i == 0 {
        return 1;
    }
    (2.0 * GAMMA.powi(i as i32) / (GAMMA + 1.0)).round() as u64
}

/// A stack's row id for one bucket of its histogram: the stack id with its low
/// [`BUCKET_BITS`] replaced by the bucket. The histogram rows of a window then
/// have the shape of any other row and merge like them, and the server needs
/// no frames for them: a row id is matched back to its stack by the high bits,
/// which two stacks of one service share with odds of about n² / 2^55.
pub fn row_id(stack_id: u64, bucket: u16) -> u64 {
    (stack_id & !(BUCKETS as u64 - 1)) | bucket as u64
}

/// The high bits of a stack id a row id keeps, and its bucket.
pub fn split_row_id(row_id: u64) -> (u64, u16) {
    (row_id & !(BUCKETS as u64 - 1), (row_id & (BUCKETS as u64 - 1)) as u16)
}

/// Weighted counts per bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: BTreeMap<u16, u64>,
}

impl Histogram {
    /// Adds one wait of `ns` weighted `weight` (in units of [`ONE`]).
    pub fn record(&mut self, ns: u64, weight: u64) {
        self.add(bucket_of(ns), weight);
    }

    /// Adds `count` to bucket `i`.
    pub fn add(&mut self, i: u16, count: u64) {
        if count > 0 {
            let slot = self.counts.entry(i.min(BUCKETS - 1)).or_default();
            *slot = slot.saturating_add(count);
        }
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (&i, &count) in &other.counts {
            self.add(i, count);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// (bucket, count) ascending.
    pub fn buckets(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.counts.iter().map(|(&i, &c)| (i, c))
    }

    /// Weighted number of waits, in units of [`ONE`].
    pub fn count(&self) -> u64 {
        self.counts.values().fold(0u64, |a, &c| a.saturating_add(c))
    }

    /// The duration below which a share `q` (0..=1) of the waits fall: the
    /// representative of the bucket holding rank q·count. None when empty.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (&i, &count) in &self.counts {
            seen += count;
            if seen >= rank {
                return Some(representative_ns(i));
            }
        }
        self.counts.keys().next_back().map(|&i| representative_ns(i))
    }

    /// The upper bound of the highest bucket with waits.
    pub fn max_ns(&self) -> Option<u64> {
        self.counts.keys().next_back().map(|&i| upper_ns(i))
    }

    /// Weighted waits in buckets whose durations all exceed `ns`, and all.
    pub fn above(&self, ns: u64) -> (u64, u64) {
        let over = self.counts.iter().filter(|(&i, _)| i > 0 && upper_ns(i - 1) >= ns).map(|(_, &c)| c).sum();
        (over, self.count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_durations_within_the_relative_error() {
        let mut ns = 2u64;
        while ns < 3_600_000_000_000 {
            let i = bucket_of(ns);
            assert!(upper_ns(i) >= ns && (i == 0 || upper_ns(i - 1) < ns), "{ns} in bucket {i}");
            let rep = representative_ns(i) as f64;
            assert!((rep - ns as f64).abs() / (ns as f64) <= RELATIVE_ERROR + 1e-3 || ns < 100, "{ns}: {rep}");
            ns = ns * 21 / 20 + 1;
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
        assert!(RELATIVE_ERROR <= 0.05);
    }

    #[test]
    fn weighted_quantiles_of_a_mixture() {
        let mut h = Histogram::default();
        // 97 waits of 2 ms, 3 of 60 ms; the long ones sampled at p = 1/2.
        for _ in 0..97 {
            h.record(2_000_000, ONE);
        }
        for _ in 0..3 {
            h.record(60_000_000, 2 * ONE);
        }
        let within = |got: u64, want: f64| (got as f64 - want).abs() / want <= RELATIVE_ERROR;
        assert!(within(h.quantile_ns(0.5).unwrap(), 2e6));
        // 6 of 103 weighted waits are long: p95 is long too.
        assert!(within(h.quantile_ns(0.95).unwrap(), 60e6));
        assert_eq!(h.count(), 103 * ONE);
        assert!(h.max_ns().unwrap() >= 60_000_000);
        assert_eq!(h.above(10_000_000), (6 * ONE, 103 * ONE));
        let mut merged = Histogram::default();
        merged.merge(&h);
        merged.merge(&h);
        assert_eq!(merged.count(), 206 * ONE);
        assert_eq!(merged.quantile_ns(0.5), h.quantile_ns(0.5));
        assert_eq!(Histogram::default().quantile_ns(0.5), None);
    }

    #[test]
    fn row_ids_keep_the_stack_and_the_bucket() {
        let stack = 0xdead_beef_cafe_f00d;
        let (high, bucket) = split_row_id(row_id(stack, 517));
        assert_eq!((high, bucket), (stack & !1023, 517));
        assert_eq!(waits_kind("off-cpu:sleep"), "waits:off-cpu:sleep");
        assert_eq!(profile_kind("waits:off-cpu:sleep"), Some("off-cpu:sleep"));
        assert!(is_waits_kind("waits:off-cpu:io") && !is_waits_kind("off-cpu:io"));
    }
}
