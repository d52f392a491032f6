//! Who a process belongs to: a service name and labels, derived without hand work from
//! its cgroup (systemd unit, container, Kubernetes pod) and executable, and overridden by
//! the user's rules.

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

pub fn identify(process: &ProcessInfo, rules: &[Rule]) -> Identity {
    let mut identity = from_cgroup(&process.cgroup, process);
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

fn executable_name(process: &ProcessInfo) -> String {
    match process.exe.rsplit('/').next() {
        Some(name) if !name.is_empty() => name.to_string(),
        // Kernel threads have no executable.
        _ if process.exe.is_empty() && process.cmdline.is_empty() => "kernel".to_string(),
        _ => process.name.clone(),
    }
}

fn from_cgroup(path: &str, process: &ProcessInfo) -> Identity {
    let mut labels = BTreeMap::new();
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();

    if let Some(uid) = components.iter().find_map(|c| pod_uid(c)) {
        labels.insert("pod_uid".to_string(), uid);
        if let Some(id) = components.last().and_then(|c| container_id(c)) {
            labels.insert("container_id".to_string(), id);
        }
        return Identity { service: executable_name(process), labels };
    }
    if let Some(id) = components.iter().rev().find_map(|c| container_id(c)) {
        labels.insert("container_id".to_string(), id);
        return Identity { service: executable_name(process), labels };
    }
    if let Some(unit) = components.iter().rev().find(|c| c.ends_with(".service")) {
        labels.insert("systemd_unit".to_string(), unit.to_string());
        let service = unit.trim_end_matches(".service");
        // Template instances (getty@tty1.service) belong to their template.
        let service = service.split('@').next().unwrap_or(service);
        return Identity { service: service.to_string(), labels };
    }
    Identity { service: executable_name(process), labels }
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
            mappings: Vec::new().into(),
            last_seen: std::time::Instant::now(),
            alive: true,
        }
    }

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn derives_service_from_cgroup_or_executable() {
        let systemd = identify(&process("/usr/bin/python3", "/system.slice/checkout.service"), &[]);
        assert_eq!(systemd.service, "checkout");
        assert_eq!(systemd.labels["systemd_unit"], "checkout.service");

        let docker = identify(&process("/app/server", &format!("/system.slice/docker-{ID}.scope")), &[]);
        assert_eq!((docker.service.as_str(), docker.labels["container_id"].as_str()), ("server", "0123456789ab"));

        let k8s = identify(
            &process(
                "/bin/api",
                &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_0000_1111_2222_333344445555.slice/cri-containerd-{ID}.scope"),
            ),
            &[],
        );
        assert_eq!(k8s.labels["pod_uid"], "1b2c3d4e-0000-1111-2222-333344445555");
        assert_eq!(k8s.labels["container_id"], "0123456789ab");

        assert_eq!(identify(&process("/usr/sbin/nginx", "/user.slice/user-0.slice/session-1.scope"), &[]).service, "nginx");
        let kernel_thread = ProcessInfo { exe: String::new(), cmdline: String::new(), ..process("", "") };
        assert_eq!(identify(&kernel_thread, &[]).service, "kernel");
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
        let identity = identify(&process("/usr/bin/x", "/system.slice/a.service"), &rules);
        assert_eq!(identity.service, "flagged");
        assert_eq!(identity.labels["team"], "core");
        assert_eq!(identity.labels["systemd_unit"], "a.service");
    }
}
