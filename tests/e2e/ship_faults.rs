//! The daemon against servers that misbehave, and the privileges it keeps.
//!
//! The server here is a stand-in written in this file: a loopback HTTP server whose
//! answer to each ingest request the test decides, and which keeps what it accepted.

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use profiler_tests::{binary, host_shared, require_root, Daemon};

/// One ingest request as the stand-in server saw it, and its answer.
#[derive(Clone, Debug)]
struct Request {
    batch_id: String,
    /// The query's kind: a pprof's (a bundle's parts name their own).
    kind: String,
    /// `bundle` or `bundle2` (with wait histograms) for our bundles of stacks windows,
    /// empty for pprof.
    format: String,
    body: Vec<u8>,
    /// `Profiler-Unanswered-Age-Ms`: how long ago an attempt of this batch got no answer.
    unanswered_age_ms: Option<u64>,
    status: u16,
}

/// A stack sent with its frames, or by id (None), and its value.
type Entry = (Option<Vec<String>>, u64);

impl Request {
    /// (kind, entries) of each part: a bundle's, or the pprof's one.
    fn parts(&self) -> Vec<(String, Vec<Entry>)> {
        use profiler_pprof::stacks::{BundleReader, Entry, Reader};
        if self.format.starts_with("bundle") {
            let raw = profiler_pprof::gunzip(&self.body, 64 << 20).unwrap();
            let parts = BundleReader::new(&raw).expect("the agent sent a bundle");
            return parts
                .map(|part| {
                    let part = part.unwrap();
                    let entries = Reader::new(part.window)
                        .unwrap()
                        .map(|entry| match entry.unwrap() {
                            Entry::Framed { frames, value } => {
                                let mut names = Vec::new();
                                frames.read_into(&mut names).unwrap();
                                (Some(names.iter().map(|n| n.to_string()).collect()), value as u64)
                            }
                            Entry::Known { value, .. } => (None, value as u64),
                        })
                        .collect();
                    (part.kind.to_string(), entries)
                })
                .collect();
        }
        let profile = profiler_pprof::decode_gzip(&self.body, 64 << 20)
            .expect("the agent sent a valid gzip pprof");
        let mut resolver = profiler_pprof::Resolver::new(&profile);
        let entries = profile
            .sample
            .iter()
            .map(|sample| {
                let mut frames = Vec::new();
                resolver.frames(sample, &mut frames).unwrap();
                (Some(frames), sample.value[0] as u64)
            })
            .collect();
        vec![(self.kind.clone(), entries)]
    }

    /// Profiled nanoseconds in the payload.
    fn value(&self) -> u64 {
        self.parts().iter().flat_map(|(_, entries)| entries).map(|(_, value)| value).sum()
    }

    /// Each stack of `kind` the payload carries frames of, root first (a bundle refers
    /// to stacks an earlier window carried by id).
    fn stacks(&self, kind: &str) -> Vec<Vec<String>> {
        self.parts()
            .into_iter()
            .filter(|(k, _)| k == kind)
            .flat_map(|(_, entries)| entries.into_iter().filter_map(|(frames, _)| frames))
            .collect()
    }

    /// (window start, part), the order in which the agent produced it: a bundle's id is
    /// `<run>-<window start>`, its part `i` sent as pprof `<run>-<window start>/<i>`.
    fn produced_order(&self) -> (u64, u64) {
        let (window, part) = self.batch_id.split_once('/').unwrap_or((&self.batch_id, "0"));
        let start = window.rsplit('-').next().unwrap().parse().unwrap();
        (start, part.parse().unwrap())
    }
}

type Answer = Box<dyn Fn(&Request) -> u16 + Send + Sync>;

/// The stand-in for the server's ingest API.
struct FakeServer {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl FakeServer {
    fn start(answer: impl Fn(&Request) -> u16 + Send + Sync + 'static) -> FakeServer {
        Self::start_on("127.0.0.1:0", answer)
    }

    fn start_on(addr: &str, answer: impl Fn(&Request) -> u16 + Send + Sync + 'static) -> FakeServer {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let answer: Arc<Answer> = Arc::new(Box::new(answer));
        {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (requests, answer) = (requests.clone(), answer.clone());
                    std::thread::spawn(move || serve(stream, &requests, &answer));
                }
            });
        }
        FakeServer {
            url: format!("http://{addr}"),
            requests,
            stop,
            addr,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    fn accepted(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.status == 200)
            .collect()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// One request per connection: the answer closes it, which the agent's client expects.
fn serve(stream: TcpStream, requests: &Mutex<Vec<Request>>, answer: &Answer) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let (mut content_length, mut unanswered_age_ms) = (0, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
            if name.eq_ignore_ascii_case("profiler-unanswered-age-ms") {
                unanswered_age_ms = value.trim().parse().ok();
            }
        }
    }
    let mut body = vec![0; content_length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let status = match target.split_once('?') {
        Some(("/api/v1/ingest", query)) => {
            let query: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            let field = |name: &str| query.get(name).cloned().unwrap_or_default();
            let mut request = Request {
                batch_id: field("batch_id"),
                kind: field("kind"),
                format: field("format"),
                body,
                unanswered_age_ms,
                status: 0,
            };
            request.status = answer(&request);
            let status = request.status;
            requests.lock().unwrap().push(request);
            status
        }
        _ => 404,
    };
    // What a server that predates the format says about it.
    let why = if status == 400 { "`format` must be pprof (default), folded or stacks" } else { "" };
    let response = format!(
        "HTTP/1.1 {status} Fake\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{why}",
        why.len()
    );
    let _ = reader.get_mut().write_all(response.as_bytes());
}

fn config(dir: &Path, server_url: &str, extra_spool: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
url = "{server_url}"
timeout = "2s"
max_attempts = 2
poll_interval = "0s"

[sampling]
window = "2s"

[spool]
dir = "{}"
{extra_spool}

[metrics]
listen = "127.0.0.1:0"
"#,
            dir.join("spool").display()
        ),
    )
    .unwrap();
    path
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every window accepted once, and everything the agent produced among them.
fn assert_each_batch_once(accepted: &[Request]) {
    let ids: BTreeSet<&str> = accepted.iter().map(|r| r.batch_id.as_str()).collect();
    assert_eq!(ids.len(), accepted.len(), "a batch was accepted twice");
    assert!(
        ids.iter().all(|id| !id.is_empty()),
        "a payload without batch_id"
    );
}

#[test]
fn a_server_refusing_the_token_for_twenty_seconds_loses_no_window() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let refuse_until = Instant::now() + Duration::from_secs(20);
    let server = FakeServer::start(move |_| {
        if Instant::now() < refuse_until {
            403
        } else {
            200
        }
    });
    let daemon = Daemon::start(&config(dir.path(), &server.url, ""));

    std::thread::sleep(refuse_until.saturating_duration_since(Instant::now()));
    assert!(server.accepted().is_empty());
    assert!(
        daemon.metric("ship_auth_failures_total") > 0.0,
        "403s are not counted"
    );
    assert!(
        daemon.metric("spool_profiles") > 0.0,
        "nothing was spooled while the server refused"
    );
    let log = daemon.take_log();
    let loud = log
        .iter()
        .filter(|line| line.contains("ERROR") && line.contains("authentication or route failed"))
        .count();
    // Logged once a minute: once in these 20 s, where every window was refused.
    assert_eq!(loud, 1, "want the refusal logged once a minute, got {loud} times in 20 s");

    wait_until(
        "the spool drained after the server accepted again",
        Duration::from_secs(30),
        || daemon.metric("spool_profiles") == 0.0,
    );
    let counters = daemon.stop();
    eprintln!("agent counters: {counters:?}");
    assert_eq!(counters["profiles_rejected"], 0);
    assert_eq!(counters["profiles_dropped"], 0);
    assert_eq!(counters["left_in_spool"], 0);
    assert!(
        counters["windows"] >= 10,
        "the agent ran over 20 s in 2 s windows"
    );
    assert_eq!(counters["profiles_shipped"], counters["profiles_produced"]);
    assert_eq!(counters["value_shipped_ns"], counters["value_produced_ns"]);

    let accepted = server.accepted();
    assert_each_batch_once(&accepted);
    assert_eq!(accepted.len() as u64, counters["profiles_produced"]);
    let total: u64 = accepted.iter().map(Request::value).sum();
    assert_eq!(
        total, counters["value_produced_ns"],
        "the server holds {total} ns, the agent produced {}",
        counters["value_produced_ns"]
    );
}

/// Windows that never reached the server (nothing listened) are replayed as first
/// deliveries however old; a window whose answer was lost says so on every later attempt,
/// and is dropped and counted apart when the server can no longer tell (410).
#[test]
fn a_window_whose_answer_was_lost_says_so_and_one_that_never_reached_the_server_does_not() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let daemon = Daemon::start(&config(dir.path(), &format!("http://{addr}"), ""));
    wait_until("windows spooled while nothing listens", Duration::from_secs(20), || {
        daemon.metric("spool_profiles") >= 2.0
    });
    // The first window to arrive is answered after the agent's 2 s timeout: the server
    // stored it, the agent cannot know. The fake then plays a server that forgot its id.
    let hung = Mutex::new(None::<String>);
    let server = FakeServer::start_on(&addr.to_string(), move |request| {
        let mut hung = hung.lock().unwrap();
        if request.unanswered_age_ms.is_some() {
            return 410;
        }
        if hung.is_none() {
            *hung = Some(request.batch_id.clone());
            std::thread::sleep(Duration::from_secs(3));
        }
        200
    });
    wait_until("the spool drained", Duration::from_secs(40), || {
        daemon.metric("spool_profiles") == 0.0 && server.accepted().len() >= 4
    });
    let counters = daemon.stop();
    eprintln!("agent counters: {counters:?}");
    let requests = server.requests();
    let first = &requests[0];
    let later: Vec<&Request> = requests.iter().filter(|r| r.batch_id == first.batch_id).skip(1).collect();
    assert_eq!(first.unanswered_age_ms, None, "{first:?}");
    assert!(!later.is_empty(), "the window whose answer was lost was not retried");
    for retry in &later {
        let age = retry.unanswered_age_ms.expect("a retry of an unanswered window without its age");
        assert!(age >= 1_500, "the age of an attempt 2 s (the timeout) ago: {age} ms");
        assert_eq!(retry.status, 410);
    }
    assert!(
        requests.iter().filter(|r| r.batch_id != first.batch_id).all(|r| r.unanswered_age_ms.is_none()),
        "windows that never reached the server were sent as retries of unanswered ones"
    );
    assert_eq!(counters["profiles_unverifiable"], 1);
    assert_eq!(counters["profiles_rejected"] + counters["profiles_dropped"] + counters["left_in_spool"], 0);
    assert_eq!(counters["profiles_shipped"] + 1, counters["profiles_produced"]);
    assert_each_batch_once(&server.accepted());
}

#[test]
fn a_server_without_bundles_is_sent_pprof_and_loses_nothing() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // What a server from before bundles says to both kinds of bundle.
    let server = FakeServer::start(|request| if request.format.starts_with("bundle") { 400 } else { 200 });
    let daemon = Daemon::start(&config(dir.path(), &server.url, ""));
    wait_until("a few windows accepted", Duration::from_secs(30), || server.accepted().len() >= 10);
    let counters = daemon.stop();
    eprintln!("agent counters: {counters:?}");
    let requests = server.requests();
    let refused: Vec<&str> = requests.iter().filter(|r| r.status == 400).map(|r| r.format.as_str()).collect();
    assert!(
        refused == ["bundle"] || refused == ["bundle2", "bundle"],
        "asked once per format, then pprof for an hour: {refused:?}"
    );
    let accepted = server.accepted();
    assert!(accepted.iter().all(|r| r.format.is_empty()), "accepted windows are pprof");
    assert_each_batch_once(&accepted);
    assert_eq!(counters["profiles_rejected"] + counters["profiles_dropped"] + counters["left_in_spool"], 0);
    assert_eq!(counters["profiles_shipped"], counters["profiles_produced"]);
    let total: u64 = accepted.iter().map(Request::value).sum();
    assert_eq!(total, counters["value_shipped_ns"]);
    assert_eq!(total, counters["value_produced_ns"]);
}

/// A server from before wait histograms takes bundles but not `bundle2`: the agent
/// sends the same windows without their histograms, as `bundle`, and loses no time.
#[test]
fn a_server_without_wait_histograms_is_sent_plain_bundles_and_loses_nothing() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(|request| if request.format == "bundle2" { 400 } else { 200 });
    let daemon = Daemon::start(&config(dir.path(), &server.url, ""));
    wait_until("a few windows accepted", Duration::from_secs(30), || server.accepted().len() >= 5);
    let counters = daemon.stop();
    let requests = server.requests();
    let refused: Vec<&Request> = requests.iter().filter(|r| r.status == 400).collect();
    assert_eq!(refused.len(), 1, "asked once, then plain bundles for an hour");
    assert_eq!(refused[0].format, "bundle2", "the host's sleeping threads gave the window wait histograms");
    let accepted = server.accepted();
    assert!(accepted.iter().all(|r| r.format == "bundle"), "accepted windows are plain bundles");
    assert_each_batch_once(&accepted);
    assert_eq!(counters["profiles_rejected"] + counters["profiles_dropped"] + counters["left_in_spool"], 0);
    assert_eq!(counters["profiles_shipped"], counters["profiles_produced"]);
    let total: u64 = accepted.iter().map(Request::value).sum();
    assert_eq!(total, counters["value_shipped_ns"]);
}

#[test]
fn a_payload_the_server_always_fails_is_dead_lettered_without_blocking_later_windows() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // The first payload the server ever sees fails, whenever it comes back.
    let poison = Arc::new(Mutex::new(None::<String>));
    let server = {
        let poison = poison.clone();
        FakeServer::start(move |request| {
            let mut poison = poison.lock().unwrap();
            if poison.get_or_insert_with(|| request.batch_id.clone()) == &request.batch_id {
                500
            } else {
                200
            }
        })
    };
    let daemon = Daemon::start(&config(dir.path(), &server.url, "dead_letter_after = 3"));

    wait_until(
        "the poison payload dead-lettered",
        Duration::from_secs(40),
        || daemon.metric("profiles_dead_lettered_total") >= 1.0,
    );
    let poison = poison.lock().unwrap().clone().unwrap();
    let last_window = |requests: &[Request]| requests.iter().map(|r| r.produced_order().0).max();
    let seen = last_window(&server.accepted());
    wait_until(
        "a later window after the dead-lettering",
        Duration::from_secs(10),
        || last_window(&server.accepted()) > seen,
    );
    let counters = daemon.stop();
    eprintln!("agent counters: {counters:?}");

    let requests = server.requests();
    let poisoned: Vec<&Request> = requests.iter().filter(|r| r.batch_id == poison).collect();
    // Two live attempts (max_attempts), then three replays (dead_letter_after).
    assert_eq!(poisoned.len(), 2 + 3, "attempts at the poison payload");
    assert_eq!(counters["profiles_dead_lettered"], 1);
    assert_eq!(counters["value_dead_lettered_ns"], poisoned[0].value());
    assert_eq!(counters["left_in_spool"], 0);
    assert_eq!(
        counters["profiles_shipped"] + 1,
        counters["profiles_produced"]
    );
    assert_eq!(
        counters["value_shipped_ns"] + counters["value_dead_lettered_ns"],
        counters["value_produced_ns"]
    );

    let accepted = server.accepted();
    assert_each_batch_once(&accepted);
    assert_eq!(accepted.len() as u64, counters["profiles_shipped"]);
    let order: Vec<(u64, u64)> = accepted.iter().map(Request::produced_order).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "windows arrived out of order");
    assert!(order
        .iter()
        .any(|&window| window > poisoned[0].produced_order()));
}

/// What the agent keeps after loading, by bit as in linux/capability.h.
const RUNTIME_CAPABILITIES: [(u32, &str); 6] = [
    (2, "CAP_DAC_READ_SEARCH"),
    (19, "CAP_SYS_PTRACE"),
    (34, "CAP_SYSLOG"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
    (40, "CAP_CHECKPOINT_RESTORE"),
];

fn capability_names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| {
            RUNTIME_CAPABILITIES
                .iter()
                .find(|(b, _)| *b == bit)
                .map_or(format!("capability {bit}"), |(_, name)| name.to_string())
        })
        .collect()
}

/// Every thread's /proc status fields, by thread name.
fn thread_statuses(pid: u32) -> Vec<(String, HashMap<String, String>)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let task = task.unwrap().path();
            let name = std::fs::read_to_string(task.join("comm"))
                .unwrap()
                .trim()
                .to_string();
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            let fields = status
                .lines()
                .filter_map(|line| line.split_once(':'))
                .map(|(key, value)| (key.to_string(), value.trim().to_string()))
                .collect();
            (name, fields)
        })
        .collect()
}

/// Checks every thread, not only the main one: capabilities and ids belong to threads.
fn assert_capabilities(pid: u32, bounding_dropped: bool) {
    let runtime: Vec<String> = RUNTIME_CAPABILITIES
        .iter()
        .map(|(_, name)| name.to_string())
        .collect();
    let statuses = thread_statuses(pid);
    assert!(
        statuses.len() >= 4,
        "the agent's threads: {:?}",
        statuses.iter().map(|(name, _)| name).collect::<Vec<_>>()
    );
    for (thread, status) in statuses {
        let set = |name: &str| capability_names(u64::from_str_radix(&status[name], 16).unwrap());
        assert_eq!(set("CapEff"), runtime, "effective set of thread {thread}");
        assert_eq!(set("CapPrm"), runtime, "permitted set of thread {thread}");
        assert_eq!(
            set("CapInh"),
            Vec::<String>::new(),
            "inheritable set of thread {thread}"
        );
        assert_eq!(
            set("CapAmb"),
            Vec::<String>::new(),
            "ambient set of thread {thread}"
        );
        if bounding_dropped {
            assert_eq!(set("CapBnd"), runtime, "bounding set of thread {thread}");
        }
        assert_eq!(status["NoNewPrivs"], "1", "no_new_privs of thread {thread}");
        // Real, effective, saved and filesystem ids: nobody, in no other group.
        for ids in ["Uid", "Gid"] {
            let ids: Vec<&str> = status[ids].split_whitespace().collect();
            assert_eq!(ids, ["65534"; 4], "{ids:?} of thread {thread}");
        }
        assert_eq!(status["Groups"], "", "supplementary groups of thread {thread}");
    }
}

/// The agent's child that turns BPF run-time statistics on and off keeps CAP_SYS_ADMIN,
/// which that takes, and nothing else.
fn assert_stats_helper(agent: u32) {
    let helpers: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            status.lines().any(|line| line.split_whitespace().eq(["PPid:".to_string(), agent.to_string()]))
                && String::from_utf8_lossy(&cmdline).contains("bpf-stats-helper")
        })
        .collect();
    assert_eq!(helpers.len(), 1, "the agent's statistics helpers: {helpers:?}");
    let (_, status) = thread_statuses(helpers[0]).remove(0);
    let set = |name: &str| capability_names(u64::from_str_radix(&status[name], 16).unwrap());
    let sys_admin = vec!["capability 21".to_string()];
    for name in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(set(name), sys_admin, "{name} of the statistics helper");
    }
    assert_eq!(set("CapInh"), Vec::<String>::new());
    assert_eq!(set("CapAmb"), Vec::<String>::new());
    assert_eq!(status["NoNewPrivs"], "1", "no_new_privs of the statistics helper");
}

/// (soft, hard) limits on open files of a process.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn after_loading_only_the_runtime_capabilities_are_left_and_both_kinds_are_profiled() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(|_| 200);
    let daemon = Daemon::start(&config(dir.path(), &server.url, ""));
    assert_capabilities(daemon.pid(), true);
    assert_stats_helper(daemon.pid());

    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) },
        0
    );
    let (soft, hard) = open_files_limit(daemon.pid());
    assert_eq!(hard, ours.rlim_max, "the hard limit is left alone");
    assert_eq!(
        soft,
        ours.rlim_max.min(65536).max(ours.rlim_cur),
        "the soft limit is raised to the hard one, up to 65536"
    );

    let status = Command::new(binary("workload"))
        .args(["mixed", "4"])
        .env("WORKLOAD_DIR", dir.path())
        .output()
        .unwrap();
    assert!(status.status.success());
    // The window the workload ended in is shipped at stop.
    daemon.stop();

    let accepted = server.accepted();
    let stacks_of = |kind: &str, function: &str| -> Vec<Vec<String>> {
        accepted
            .iter()
            .flat_map(|r| r.stacks(kind))
            .filter(|frames| frames.iter().any(|frame| frame.starts_with(function)))
            .collect()
    };
    assert!(
        !stacks_of("on-cpu", "workload::burn_cpu").is_empty(),
        "no on-CPU stack of burn_cpu"
    );
    // The reason `sleep` comes from kernel frames: naming them needs CAP_SYSLOG.
    let sleeps = stacks_of("off-cpu:sleep", "workload::wait_sleep");
    assert!(!sleeps.is_empty(), "no off-CPU sleep of wait_sleep");
    for frames in &sleeps {
        assert!(
            frames.iter().any(|f| f.ends_with("_[k]")),
            "a sleep without kernel frames: {frames:?}"
        );
        assert!(
            !frames
                .iter()
                .any(|f| f.starts_with("[unknown]") && f.ends_with("_[k]")),
            "unnamed kernel frames: {frames:?}"
        );
    }
}

/// A host that starts the agent as an ordinary user with just the runtime capabilities
/// (ambient, as systemd's AmbientCapabilities= does): there is nothing to drop but the
/// bounding set, which needs CAP_SETPCAP, and the agent still runs and profiles.
#[test]
fn started_as_a_user_with_the_runtime_capabilities_it_runs_and_keeps_them() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let nobody = 65534;
    std::os::unix::fs::chown(dir.path(), Some(nobody), Some(nobody)).unwrap();
    let server = FakeServer::start(|_| 200);
    let caps = RUNTIME_CAPABILITIES
        .iter()
        .map(|(_, name)| format!("+{}", name.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let (inheritable, ambient) = (
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
    );
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &inheritable,
        &ambient,
        "--",
    ];
    let daemon = Daemon::start_under(&wrapper, &config(dir.path(), &server.url, ""));
    assert_capabilities(daemon.pid(), false);
    wait_until("a window shipped", Duration::from_secs(10), || {
        !server.accepted().is_empty()
    });
    let counters = daemon.stop();
    assert_eq!(counters["profiles_shipped"], counters["profiles_produced"]);
}

/// The systemd unit's `CapabilityBoundingSet=` is all the agent ever holds there: started
/// as root within it, the agent loads, becomes nobody and profiles. The list is read from
/// the unit itself, so a capability the agent comes to need fails here first.
#[test]
fn within_the_systemd_units_bounding_set_the_agent_loads_and_becomes_nobody() {
    let _host = host_shared();
    require_root();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/profiler-agent.service")).unwrap();
    let bounding: Vec<String> = unit
        .lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=")
        .split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(|_| 200);
    let bounding = format!("--bounding-set=-all,{}", bounding.join(","));
    let daemon = Daemon::start_under(&["setpriv", &bounding, "--"], &config(dir.path(), &server.url, ""));
    assert_capabilities(daemon.pid(), true);
    assert_stats_helper(daemon.pid());
    wait_until("a window shipped", Duration::from_secs(10), || !server.accepted().is_empty());
    let counters = daemon.stop();
    assert_eq!(counters["profiles_shipped"], counters["profiles_produced"]);
}

/// A library that spins through a long straight run of code, so samples land on ever new
/// addresses: each one the agent has not unwound or named before sends it back to the
/// library's `.eh_frame` and symbols, in its own mappings of the file.
const SPIN_LIBRARY: &str = r#"
#define STEP x = x * 6364136223846793005UL + 1442695040888963407UL; __asm__ volatile("" : "+r"(x));
#define STEP16 STEP STEP STEP STEP STEP STEP STEP STEP STEP STEP STEP STEP STEP STEP STEP STEP
#define STEP256 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16 STEP16
unsigned long lib_spin(unsigned long x) { STEP256 STEP256 STEP256 STEP256 STEP256 STEP256 STEP256 STEP256 return x; }
"#;

const SPIN_MAIN: &str = r#"
unsigned long lib_spin(unsigned long);
int main(void) { unsigned long x = 1; for (;;) x = lib_spin(x); }
"#;

/// A child that must not outlive a failed test (it would hold the harness's output open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the library's executable segment ends in the file: its code stays, its
/// `.eh_frame`, symbols and debug info (all after it) go.
fn end_of_code(library: &Path) -> u64 {
    let out = Command::new("readelf").args(["-lW"]).arg(library).output().unwrap();
    assert!(out.status.success(), "readelf: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|line| line.trim_start().starts_with("LOAD") && line.contains(" R E "))
        .expect("an executable LOAD segment");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    (hex(fields[1]) + hex(fields[4])).next_multiple_of(4096)
}

/// A user truncates a library of theirs while the agent (root) has it mapped for
/// unwinding and symbolization; the process keeps running code in what is left. Reading
/// the cut pages raises SIGBUS, which used to kill the agent: now they read as zeros,
/// are counted, and the agent goes on shipping windows.
#[test]
fn a_user_truncating_a_library_the_agent_has_mapped_does_not_kill_it() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    let (library, program) = (theirs.join("libspin.so"), theirs.join("spinner"));
    std::fs::write(theirs.join("lib.c"), SPIN_LIBRARY).unwrap();
    std::fs::write(theirs.join("main.c"), SPIN_MAIN).unwrap();
    let gcc = |args: &[&str]| {
        let out = Command::new("gcc").args(args).current_dir(&theirs).output().expect("gcc builds the test library");
        assert!(out.status.success(), "gcc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    gcc(&["-O1", "-g", "-shared", "-fPIC", "-o", "libspin.so", "lib.c"]);
    gcc(&["-O1", "-o", "spinner", "main.c", "-L.", "-lspin", &format!("-Wl,-rpath,{}", theirs.display())]);
    let nobody = 65534;
    for path in [&theirs, &library, &program] {
        std::os::unix::fs::chown(path, Some(nobody), Some(nobody)).unwrap();
    }
    let as_nobody = |program: &str| {
        let mut command = Command::new("setpriv");
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
        command
    };
    let mut spinner = KillOnDrop(as_nobody(program.to_str().unwrap()).spawn().unwrap());
    let server = FakeServer::start(|_| 200);
    let daemon = Daemon::start(&config(dir.path(), &server.url, ""));
    let spins = |server: &FakeServer| {
        server.accepted().iter().flat_map(|r| r.stacks("on-cpu")).filter(|frames| frames.iter().any(|f| f.starts_with("lib_spin"))).count()
    };
    wait_until("a window with lib_spin", Duration::from_secs(20), || spins(&server) > 0);

    let cut = end_of_code(&library);
    let len = std::fs::metadata(&library).unwrap().len();
    assert!(cut < len, "nothing after the code to cut ({cut} of {len} bytes)");
    let status = as_nobody("truncate").args(["-s", &cut.to_string()]).arg(&library).status().unwrap();
    assert!(status.success());
    wait_until("the agent reading a cut page", Duration::from_secs(20), || daemon.metric("file_pages_truncated_total") > 0.0);
    let before = server.accepted().len();
    wait_until("two more windows shipped", Duration::from_secs(20), || server.accepted().len() >= before + 2);
    assert!(spinner.0.try_wait().unwrap().is_none(), "the spinner died: the test no longer runs code in the library");
    drop(spinner);
    let counters = daemon.stop();
    assert_eq!(counters["profiles_shipped"], counters["profiles_produced"]);
}
