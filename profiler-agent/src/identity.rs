//! Who a process belongs to: a service name and labels, derived without hand work from
//! its cgroup (systemd unit, login session, container, Kubernetes pod), its session
//! leader and executable, and overridden by the user's rules.
//!
//! Short-lived commands must not become services of their own: a shell script's `sed`
//! and `expr` belong to the script, a terminal's commands to the user's session. So a
//! process outside any unit or login session takes the name of its session's leader
//! (what `setsid` started: a daemon, a cron job, a container's entry point, a terminal),
//! and names are made from what a user recognises (a script rather than its
//! interpreter; the command name rather than a `memfd:` or deleted file).

use std::collections::BTreeMap;

use regex::Regex;

use crate::process::ProcessInfo;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub service: String,
    pub labels: BTreeMap<String, String>,
}

/// A user rule: every given pattern must match; the first matching rule wins.
#[derive(Clone, Debug)]
pub struct Rule {
    pub comm: Option<Regex>,
    pub exe: Option<Regex>,
    pub cmdline: Option<Regex>,
    pub cgroup: Option<Regex>,
    pub service: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl Rule {
    fn matches(&self, process: &ProcessInfo) -> bool {
        let test = |pattern: &Option<Regex>, text: &str| pattern.as_ref().is_none_or(|re| re.is_match(text));
        test(&self.comm, &process.name)
            && test(&self.exe, &process.exe)
            && test(&self.cmdline, &process.cmdline)
            && test(&self.cgroup, &process.cgroup)
    }
}

/// The identity of `process`; `leader` is its session's leader when that is another
/// process (see the module documentation).
pub fn identify(process: &ProcessInfo, leader: Option<&ProcessInfo>, rules: &[Rule]) -> Identity {
    let mut identity = from_cgroup(&process.cgroup, process);
    // Which build runs, and which version it says it is: a deploy changes them, and
    // the server compares before with after.
    if let Some(build_id) = &process.build_id {
        identity.labels.insert("build_id".to_string(), build_id.clone());
    }
    if let Some(version) = &process.version {
        identity.labels.insert("version".to_string(), version.clone());
    }
    if identity.service.is_empty() {
        identity.service = match leader {
            // A rule naming the leader names its session's commands too. A command
            // that exited while it was read may lack its cgroup (it reads as the root).
            Some(leader) if leader.cgroup == process.cgroup || process.cgroup.is_empty() => {
                identify(leader, None, rules).service
            }
            _ => process_name(process),
        };
    }
    if let Some(rule) = rules.iter().find(|rule| rule.matches(process)) {
        if let Some(service) = &rule.service {
            identity.service = service.clone();
        }
        identity.labels.extend(rule.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    identity
}

/// Identity of a process whose snapshot is gone (it exited before we saw it).
pub fn unknown_process(comm: &str) -> Identity {
    Identity { service: comm.to_string(), labels: BTreeMap::new() }
}

/// Shells: each runs a script, inline code (`-c`) or a user's terminal.
const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "fish"];
/// Other interpreters (and `python*`): each is known by the script it runs, its first
/// argument that is not an option.
const SCRIPT_RUNNERS: &[&str] = &["perl", "ruby", "node", "php"];

/// The name a user knows a process by: its script for an interpreter running one,
/// `session-<user>` for an interactive shell, else its executable's base name (the
/// command name where the executable is a `memfd:` or an anonymous file).
fn process_name(process: &ProcessInfo) -> String {
    // Kernel threads have no executable and no session (a process that exited while it
    // was read may have lost the first two only).
    if process.exe.is_empty() && process.cmdline.is_empty() && process.session == 0 {
        return "kernel".to_string();
    }
    let exe = process.exe.rsplit('/').next().unwrap_or_default();
    if exe.is_empty() || process.exe.starts_with("/memfd:") || !process.exe.starts_with('/') {
        return process.name.clone();
    }
    let shell = SHELLS.contains(&exe);
    if !shell && !SCRIPT_RUNNERS.contains(&exe) && !exe.starts_with("python") {
        return exe.to_string();
    }
    // argv[0] is the interpreter; `-c` runs inline code, named after the interpreter.
    let script = process.cmdline.split(' ').skip(1).take_while(|arg| *arg != "-c").find(|arg| !arg.starts_with('-'));
    match script.and_then(|s| std::path::Path::new(s).file_stem()?.to_str()) {
        Some(stem) if !stem.is_empty() => stem.to_string(),
        _ if shell && process.cmdline.split(' ').all(|arg| arg != "-c") => format!("session-{}", user_name(process.uid)),
        _ => exe.to_string(),
    }
}

/// The user's name from the agent's /etc/passwd, else `uid<N>`.
fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                (fields.nth(1)?.parse() == Ok(uid)).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| format!("uid{uid}"))
}

fn from_cgroup(path: &str, process: &ProcessInfo) -> Identity {
    let mut labels = BTreeMap::new();
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();

    if let Some(uid) = components.iter().find_map(|c| pod_uid(c)) {
        labels.insert("pod_uid".to_string(), uid);
        if let Some(id) = components.last().and_then(|c| container_id(c)) {
            labels.insert("container_id".to_string(), id);
        }
        return Identity { service: String::new(), labels };
    }
    if let Some(id) = components.iter().rev().find_map(|c| container_id(c)) {
        labels.insert("container_id".to_string(), id);
        return Identity { service: String::new(), labels };
    }
    if let Some(unit) = components.iter().rev().find(|c| c.ends_with(".service")) {
        labels.insert("systemd_unit".to_string(), unit.to_string());
        let service = unit.trim_end_matches(".service");
        // Template instances (getty@tty1.service) belong to their template.
        let service = service.split('@').next().unwrap_or(service);
        return Identity { service: service.to_string(), labels };
    }
    // A login session (systemd-logind): the user's terminals and what they start.
    if components.last().is_some_and(|c| c.starts_with("session-") && c.ends_with(".scope")) {
        return Identity { service: format!("session-{}", user_name(process.uid)), labels };
    }
    // No unit of its own: named after its session leader or itself.
    Identity { service: String::new(), labels }
}

/// `kubepods-burstable-pod1234_5678.slice` (systemd driver) or `pod1234-5678` (cgroupfs).
fn pod_uid(component: &str) -> Option<String> {
    let start = component.rfind("pod")? + 3;
    let uid = component[start..].trim_end_matches(".slice");
    let looks_like_uid = uid.len() >= 32 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    looks_like_uid.then(|| uid.replace('_', "-"))
}

/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, or a bare id.
fn container_id(component: &str) -> Option<String> {
    let trimmed = component.trim_end_matches(".scope");
    let id = trimmed.rsplit('-').next().unwrap_or(trimmed);
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id[..12].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(exe: &str, cgroup: &str) -> ProcessInfo {
        ProcessInfo {
            name: "comm".into(),
            exe: exe.into(),
            cmdline: format!("{exe} --flag"),
            cgroup: cgroup.into(),
            session: 0,
            uid: 0,
            build_id: None,
            version: None,
            mappings: Vec::new().into(),
            last_seen: std::time::Instant::now(),
            alive: true,
        }
    }

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn build_and_version_become_labels_and_rules_still_win() {
        let deployed = ProcessInfo { build_id: Some("ab12".into()), version: Some("1.5".into()), ..process("/srv/api", "/system.slice/api.service") };
        let id = identify(&deployed, None, &[]);
        assert_eq!((id.labels["build_id"].as_str(), id.labels["version"].as_str()), ("ab12", "1.5"));
        let labels = [("version".to_string(), "canary".to_string())].into();
        let pinned = Rule { comm: None, exe: None, cmdline: None, cgroup: None, service: None, labels };
        assert_eq!(identify(&deployed, None, &[pinned]).labels["version"], "canary");
    }

    #[test]
    fn derives_service_from_cgroup_or_executable() {
        let systemd = identify(&process("/usr/bin/python3", "/system.slice/checkout.service"), None, &[]);
        assert_eq!(systemd.service, "checkout");
        assert_eq!(systemd.labels["systemd_unit"], "checkout.service");

        let docker = identify(&process("/app/server", &format!("/system.slice/docker-{ID}.scope")), None, &[]);
        assert_eq!((docker.service.as_str(), docker.labels["container_id"].as_str()), ("server", "0123456789ab"));

        let k8s = identify(
            &process(
                "/bin/api",
                &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_0000_1111_2222_333344445555.slice/cri-containerd-{ID}.scope"),
            ),
            None,
            &[],
        );
        assert_eq!(k8s.labels["pod_uid"], "1b2c3d4e-0000-1111-2222-333344445555");
        assert_eq!(k8s.labels["container_id"], "0123456789ab");

        let login = identify(&process("/usr/sbin/nginx", "/user.slice/user-0.slice/session-1.scope"), None, &[]);
        assert_eq!(login.service, "session-root");
        let kernel_thread = ProcessInfo { exe: String::new(), cmdline: String::new(), ..process("", "") };
        assert_eq!(identify(&kernel_thread, None, &[]).service, "kernel");
    }

    #[test]
    fn first_matching_rule_overrides() {
        let rules = [
            Rule { comm: None, exe: Some(Regex::new("nothing").unwrap()), cmdline: None, cgroup: None, service: Some("no".into()), labels: BTreeMap::new() },
            Rule {
                comm: None,
                exe: None,
                cmdline: Some(Regex::new("--flag").unwrap()),
                cgroup: None,
                service: Some("flagged".into()),
                labels: [("team".to_string(), "core".to_string())].into(),
            },
        ];
        let identity = identify(&process("/usr/bin/x", "/system.slice/a.service"), None, &rules);
        assert_eq!(identity.service, "flagged");
        assert_eq!(identity.labels["team"], "core");
        assert_eq!(identity.labels["systemd_unit"], "a.service");
    }

    fn spawned(exe: &str, cmdline: &str) -> ProcessInfo {
        ProcessInfo { cmdline: cmdline.into(), session: 100, ..process(exe, "") }
    }

    #[test]
    fn commands_take_their_session_leaders_name() {
        let script = spawned("/usr/bin/dash", "sh -e /opt/jobs/nightly-report.sh --full");
        assert_eq!(identify(&script, None, &[]).service, "nightly-report");
        let sed = spawned("/usr/bin/sed", "sed -n 1p");
        assert_eq!(identify(&sed, Some(&script), &[]).service, "nightly-report");
        // A terminal's commands belong to the user's session.
        let terminal = spawned("/usr/bin/bash", "-bash");
        assert_eq!(identify(&sed, Some(&terminal), &[]).service, "session-root");
        assert_eq!(identify(&spawned("/bin/sh", "sh -c 'echo hi'"), None, &[]).service, "sh");
        assert_eq!(identify(&spawned("/usr/bin/python3.11", "python3 -u app.py"), None, &[]).service, "app");
        // A leader in another cgroup does not name it.
        let unit = ProcessInfo { cgroup: "/system.slice/api.service".into(), ..spawned("/srv/api", "api") };
        let elsewhere = ProcessInfo { cgroup: "/batch.slice".into(), ..sed.clone() };
        assert_eq!(identify(&elsewhere, Some(&unit), &[]).service, "sed");
        // The leader's rules name its commands; the command's own rule wins.
        let rule = |pattern: &str, service: &str| Rule {
            comm: None,
            exe: None,
            cmdline: Some(Regex::new(pattern).unwrap()),
            cgroup: None,
            service: Some(service.into()),
            labels: BTreeMap::new(),
        };
        assert_eq!(identify(&sed, Some(&script), &[rule("nightly", "reports")]).service, "reports");
        assert_eq!(identify(&sed, Some(&script), &[rule("^sed", "editor"), rule("nightly", "reports")]).service, "editor");
        // A command read while it exited: no executable, command line or cgroup left.
        let exited = ProcessInfo { name: "gzip".into(), ..spawned("", "") };
        let script_in_cgroup = ProcessInfo { cgroup: "/process_api/42".into(), ..script.clone() };
        assert_eq!(identify(&exited, Some(&script_in_cgroup), &[]).service, "nightly-report");
        assert_eq!(identify(&exited, None, &[]).service, "gzip");
    }

    #[test]
    fn memfd_and_anonymous_executables_are_named_by_command() {
        let memfd = ProcessInfo { name: "chrome".into(), ..spawned("/memfd:sealed-91173221a7ea", "chrome --type=zygote") };
        assert_eq!(identify(&memfd, None, &[]).service, "chrome");
    }
}
