//! Profile kinds as the agent ships them and the server stores them
//! (`on-cpu`, `off-cpu:sleep`, ...), and the `[kind]` root frame that keeps
//! kinds apart when stacks of several kinds share one folded file, pprof or
//! flame graph.
//!
//! The server also stores third-party kinds (`cpu`, `alloc_space`, ...) by
//! name, so the functions on names accept any kind; the enums cover the ones
//! the agent produces.

/// Why a thread was off-CPU. The agent decides (its `classify` module); the
/// name travels in the kind name and picks the flame-graph colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitReason {
    /// Preempted while runnable: waiting for a CPU.
    Runnable,
    BlockedIo,
    BlockedLock,
    BlockedNet,
    Sleep,
    /// epoll/poll/select with nothing to do: usually expected idleness.
    IdlePoll,
    /// Anything the agent does not recognise (pipes, wait4, signals...).
    Other,
}

impl WaitReason {
    pub const ALL: [WaitReason; 7] = [
        WaitReason::Runnable,
        WaitReason::BlockedIo,
        WaitReason::BlockedLock,
        WaitReason::BlockedNet,
        WaitReason::Sleep,
        WaitReason::IdlePoll,
        WaitReason::Other,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            WaitReason::Runnable => "runnable",
            WaitReason::BlockedIo => "blocked-io",
            WaitReason::BlockedLock => "blocked-lock",
            WaitReason::BlockedNet => "blocked-net",
            WaitReason::Sleep => "sleep",
            WaitReason::IdlePoll => "idle-poll",
            WaitReason::Other => "other",
        }
    }

    pub fn from_name(name: &str) -> Option<WaitReason> {
        WaitReason::ALL
            .into_iter()
            .find(|reason| reason.name() == name)
    }
}

/// The kinds the agent produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    OnCpu,
    OffCpu(WaitReason),
}

pub const ON_CPU: &str = "on-cpu";
pub const OFF_CPU: &str = "off-cpu";
/// What Pyroscope's SDKs call their CPU profiles.
const SDK_CPU: &str = "cpu";

impl Kind {
    pub fn name(self) -> String {
        match self {
            Kind::OnCpu => ON_CPU.to_string(),
            Kind::OffCpu(reason) => format!("{OFF_CPU}:{}", reason.name()),
        }
    }

    pub fn root_frame(self) -> String {
        root_frame(&self.name())
    }
}

/// The synthetic root frame that tags a stack with its kind: `[off-cpu:sleep]`.
pub fn root_frame(kind: &str) -> String {
    format!("[{kind}]")
}

/// The wait reason part of an off-CPU kind name (`sleep` of `off-cpu:sleep`,
/// empty for a bare `off-cpu`); `None` for kinds that are not off-CPU.
/// Reasons the agent does not produce are returned too: the server keeps
/// whatever kind names it was sent.
pub fn off_cpu_reason(kind: &str) -> Option<&str> {
    kind.strip_prefix(OFF_CPU)
        .map(|reason| reason.trim_start_matches(':'))
}

/// Whether a kind's values are on-CPU time: the agent's, and CPU profiles
/// pushed by Pyroscope SDKs.
pub fn is_on_cpu(kind: &str) -> bool {
    kind == ON_CPU || kind == SDK_CPU
}

/// The name a kind is compared and summed under: CPU profiles of SDKs are
/// on-CPU time; any other kind is itself.
pub fn canonical(kind: &str) -> &str {
    if is_on_cpu(kind) {
        ON_CPU
    } else {
        kind
    }
}

/// Whether `kinds` holds more than one distinct kind, so that stacks need
/// their [`root_frame`] to keep, say, on-CPU and off-CPU time of one
/// function apart.
pub fn several_kinds<'a>(kinds: impl IntoIterator<Item = &'a str>) -> bool {
    let mut kinds = kinds.into_iter();
    let first = kinds.next();
    kinds.any(|kind| Some(kind) != first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_root_frames() {
        assert_eq!(Kind::OnCpu.name(), "on-cpu");
        assert_eq!(
            Kind::OffCpu(WaitReason::BlockedIo).name(),
            "off-cpu:blocked-io"
        );
        assert_eq!(
            Kind::OffCpu(WaitReason::Sleep).root_frame(),
            "[off-cpu:sleep]"
        );
        assert_eq!(root_frame("alloc_space"), "[alloc_space]");
        for reason in WaitReason::ALL {
            assert_eq!(WaitReason::from_name(reason.name()), Some(reason));
            assert_eq!(
                off_cpu_reason(&Kind::OffCpu(reason).name()),
                Some(reason.name())
            );
        }
        assert_eq!(WaitReason::from_name("on-cpu"), None);
    }

    #[test]
    fn off_cpu_reasons_of_any_kind_name() {
        assert_eq!(off_cpu_reason("on-cpu"), None);
        assert_eq!(off_cpu_reason("cpu"), None);
        assert_eq!(off_cpu_reason("off-cpu"), Some(""));
        assert_eq!(off_cpu_reason("off-cpu:weird"), Some("weird"));
    }

    #[test]
    fn several_kinds_needs_two_distinct_names() {
        assert!(!several_kinds([]));
        assert!(!several_kinds(["on-cpu", "on-cpu"]));
        assert!(several_kinds(["on-cpu", "on-cpu", "off-cpu:sleep"]));
    }
}
