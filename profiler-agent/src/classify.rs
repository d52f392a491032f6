//! Why a thread was off-CPU, from its task state and kernel stack.
//!
//! Rules are checked in order; the first whose function prefix matches any kernel frame
//! wins. To teach the profiler a new wait, add a row to [`RULES`]; a new reason goes in
//! `profiler_pprof::kind`, with its flame-graph colour in `profiler_pprof::flamegraph`.

use profiler_common::{STATE_PREEMPTED, TASK_UNINTERRUPTIBLE};
use profiler_pprof::kind::WaitReason;

use crate::symbolize::KERNEL_SUFFIX;

/// (kernel function prefix, reason), most specific first: an epoll wait on sockets is
/// idle polling, not a network wait.
const RULES: &[(&str, WaitReason)] = &[
    ("do_epoll_wait", WaitReason::IdlePoll),
    ("ep_poll", WaitReason::IdlePoll),
    ("do_sys_poll", WaitReason::IdlePoll),
    ("do_poll", WaitReason::IdlePoll),
    ("do_select", WaitReason::IdlePoll),
    ("core_sys_select", WaitReason::IdlePoll),
    ("futex_wait", WaitReason::BlockedLock),
    ("__futex_wait", WaitReason::BlockedLock),
    ("__mutex_lock", WaitReason::BlockedLock),
    ("mutex_lock", WaitReason::BlockedLock),
    ("rwsem_down_", WaitReason::BlockedLock),
    ("rt_mutex_", WaitReason::BlockedLock),
    ("percpu_rwsem_wait", WaitReason::BlockedLock),
    ("sk_wait_data", WaitReason::BlockedNet),
    ("inet_csk_accept", WaitReason::BlockedNet),
    ("inet_csk_wait_for_connect", WaitReason::BlockedNet),
    ("sk_stream_wait_", WaitReason::BlockedNet),
    ("tcp_recvmsg", WaitReason::BlockedNet),
    ("udp_recvmsg", WaitReason::BlockedNet),
    ("unix_stream_read_generic", WaitReason::BlockedNet),
    ("unix_dgram_recvmsg", WaitReason::BlockedNet),
    ("__skb_wait_for_more_packets", WaitReason::BlockedNet),
    ("io_schedule", WaitReason::BlockedIo),
    ("folio_wait_bit", WaitReason::BlockedIo),
    ("blk_mq_get_tag", WaitReason::BlockedIo),
    ("submit_bio_wait", WaitReason::BlockedIo),
    ("jbd2_log_wait_commit", WaitReason::BlockedIo),
    ("file_write_and_wait_range", WaitReason::BlockedIo),
    ("__filemap_fdatawait_range", WaitReason::BlockedIo),
    ("do_nanosleep", WaitReason::Sleep),
    ("hrtimer_nanosleep", WaitReason::Sleep),
    ("common_nsleep", WaitReason::Sleep),
    ("msleep", WaitReason::Sleep),
];

/// `state` is the switch-out state recorded by the BPF program; `kernel_frames` are
/// symbolized kernel frames in any order.
pub fn classify<S: AsRef<str>>(state: u32, kernel_frames: &[S]) -> WaitReason {
    if state & STATE_PREEMPTED != 0 {
        return WaitReason::Runnable;
    }
    for (prefix, reason) in RULES {
        let matches = kernel_frames.iter().any(|frame| {
            let name = frame.as_ref();
            name.strip_suffix(KERNEL_SUFFIX).unwrap_or(name).starts_with(prefix)
        });
        if matches {
            return *reason;
        }
    }
    if state & TASK_UNINTERRUPTIBLE != 0 {
        // Uninterruptible sleep outside the known sites is almost always storage.
        return WaitReason::BlockedIo;
    }
    WaitReason::Other
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::TASK_INTERRUPTIBLE;

    #[test]
    fn classifies_by_kernel_stack_and_state() {
        let sleep = ["entry_SYSCALL_64_[k]", "__x64_sys_clock_nanosleep_[k]", "hrtimer_nanosleep_[k]", "do_nanosleep_[k]", "schedule_[k]"];
        assert_eq!(classify(TASK_INTERRUPTIBLE, &sleep), WaitReason::Sleep);
        let futex = ["__x64_sys_futex_[k]", "do_futex_[k]", "futex_wait_[k]", "schedule_[k]"];
        assert_eq!(classify(TASK_INTERRUPTIBLE, &futex), WaitReason::BlockedLock);
        let epoll_on_socket = ["do_epoll_wait_[k]", "ep_poll_[k]", "schedule_hrtimeout_range_[k]"];
        assert_eq!(classify(TASK_INTERRUPTIBLE, &epoll_on_socket), WaitReason::IdlePoll);
        let fsync = ["do_fsync_[k]", "ext4_sync_file_[k]", "file_write_and_wait_range_[k]", "io_schedule_[k]"];
        assert_eq!(classify(TASK_UNINTERRUPTIBLE, &fsync), WaitReason::BlockedIo);
        let recv = ["tcp_recvmsg_[k]", "sk_wait_data_[k]"];
        assert_eq!(classify(TASK_INTERRUPTIBLE, &recv), WaitReason::BlockedNet);
    }

    #[test]
    fn preemption_wins_and_state_is_the_fallback() {
        assert_eq!(classify(STATE_PREEMPTED, &["futex_wait_[k]"]), WaitReason::Runnable);
        assert_eq!(classify::<&str>(TASK_UNINTERRUPTIBLE, &[]), WaitReason::BlockedIo);
        assert_eq!(classify(TASK_INTERRUPTIBLE, &["pipe_read_[k]"]), WaitReason::Other);
    }
}
