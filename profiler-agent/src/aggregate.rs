//! Aggregate stage: merges symbolized windows into one profile of (kind, stack) -> value,
//! and writes it as folded stacks.

use std::{collections::HashMap, sync::Arc};

use profiler_pprof::{folded, kind::Kind};

use crate::{classify::classify, sample::RawValue, symbolize::SymbolizedSample};

/// Unit of the profile's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units {
    /// On-CPU sample counts (on-CPU only profiles).
    Samples,
    /// Nanoseconds for both kinds: on-CPU samples × sampling period.
    Nanoseconds,
}

#[derive(Clone, Debug)]
pub struct AggregateOptions {
    /// Keep only processes (or threads) with this name.
    pub comm: Option<String>,
    pub units: Units,
    /// On-CPU sampling period, to convert samples to nanoseconds.
    pub period_ns: u64,
}

/// A stack: process name first, then user frames, then kernel frames.
pub type Stack = Vec<Arc<str>>;

#[derive(Debug, Default)]
pub struct Profile {
    pub values: HashMap<(Kind, Stack), u64>,
    /// Number of off-CPU waits behind the off-CPU values (sampled, not scaled).
    pub waits: u64,
}

impl Profile {
    pub fn add(&mut self, samples: &[SymbolizedSample], options: &AggregateOptions) {
        for sample in samples {
            if let Some(comm) = &options.comm {
                let thread = crate::symbolize::comm_name(&sample.key.comm);
                if &sample.process != comm && &thread != comm {
                    continue;
                }
            }
            let (kind, value) = match sample.value {
                RawValue::OnCpuSamples(count) => (
                    Kind::OnCpu,
                    match options.units {
                        Units::Samples => count,
                        Units::Nanoseconds => count * options.period_ns,
                    },
                ),
                RawValue::OffCpu { ns, waits, .. } => {
                    self.waits += waits;
                    (Kind::OffCpu(classify(sample.key.state, &sample.kernel_frames)), ns)
                }
            };
            let mut stack = Vec::with_capacity(1 + sample.user_frames.len() + sample.kernel_frames.len());
            stack.push(Arc::from(sample.process.as_str()));
            stack.extend(sample.user_frames.iter().cloned());
            stack.extend(sample.kernel_frames.iter().cloned());
            *self.values.entry((kind, stack)).or_default() += value;
        }
    }

    pub fn total(&self, kind: impl Fn(Kind) -> bool) -> u64 {
        self.values.iter().filter(|((k, _), _)| kind(*k)).map(|(_, v)| v).sum()
    }

    /// Folded stacks, one `frame;frame;... value` line per distinct stack, sorted.
    /// With `tag_kind`, each stack starts with its kind frame, e.g. `[off-cpu:sleep]`.
    pub fn folded(&self, tag_kind: bool) -> String {
        folded::write(self.stacks(), tag_kind)
    }

    /// `(kind name, stack, value)` of every stack with a value, the shape
    /// `profiler_pprof`'s folded writer and flame-graph renderer take.
    pub fn stacks(&self) -> impl Iterator<Item = (String, &Stack, i64)> {
        self.values
            .iter()
            .filter(|(_, value)| **value > 0)
            .map(|((kind, stack), value)| (kind.name(), stack, *value as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::{STATE_PREEMPTED, TASK_INTERRUPTIBLE};
    use crate::sample::SampleKey;

    fn sample(state: u32, user: &[&str], kernel: &[&str], value: RawValue) -> SymbolizedSample {
        SymbolizedSample {
            key: SampleKey { tgid: 1, pid: 1, state, comm: *b"worker\0\0\0\0\0\0\0\0\0\0", labels: 0, request: 0 },
            process: "app".into(),
            user_frames: user.iter().map(|f| Arc::from(*f)).collect(),
            kernel_frames: kernel.iter().map(|f| Arc::from(*f)).collect(),
            value,
        }
    }

    #[test]
    fn folds_both_kinds_in_nanoseconds_with_kind_roots() {
        let options = AggregateOptions { comm: None, units: Units::Nanoseconds, period_ns: 10 };
        let mut profile = Profile::default();
        profile.add(
            &[
                sample(0, &["main", "burn;cpu"], &[], RawValue::OnCpuSamples(3)),
                sample(0, &["main", "burn;cpu"], &[], RawValue::OnCpuSamples(2)),
                sample(TASK_INTERRUPTIBLE, &["main", "nap"], &["do_nanosleep_[k]"], RawValue::OffCpu { ns: 700, waits: 7, durations: Default::default() }),
                sample(STATE_PREEMPTED, &["main"], &[], RawValue::wait(5, 1 << 16)),
            ],
            &options,
        );
        assert_eq!(
            profile.folded(true),
            "[off-cpu:runnable];app;main 5\n[off-cpu:sleep];app;main;nap;do_nanosleep_[k] 700\n[on-cpu];app;main;burn:cpu 50\n"
        );
        assert_eq!(profile.waits, 8);
    }

    #[test]
    fn comm_filter_matches_process_or_thread_name() {
        let mut profile = Profile::default();
        let samples = [sample(0, &["main"], &[], RawValue::OnCpuSamples(1))];
        for (comm, expected) in [("app", 1), ("worker", 1), ("other", 0)] {
            profile.values.clear();
            let options = AggregateOptions { comm: Some(comm.into()), units: Units::Samples, period_ns: 1 };
            profile.add(&samples, &options);
            assert_eq!(profile.total(|_| true), expected, "{comm}");
        }
    }
}
