//! The lab roster (`[lab]` in the image spec): who may log in to the notebooks, with which fixed
//! uid and gid, in which projects, and what each project's kernels may use.
//!
//! The builder checks it and carries it in `stack.json`; templates see its derived form
//! ([`LabView`], as `lab`) so that a project's namespace, ResourceQuota and LimitRange come from
//! the roster and from nothing a user could set. Quantities are written as Kubernetes writes
//! them (`500m`, `0.5`, `512Mi`) and handed to templates in one canonical form (millicores,
//! bytes), already checked: a minimum above its maximum, a quota below one kernel's maximum, a
//! uid of root or two users sharing a uid are refused at build time.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The namespace a project's notebook servers and kernels run in.
pub fn project_namespace(project: &str) -> String {
    format!("lab-{project}")
}

/// Lowest uid and gid a roster may give: below are the system accounts of the images.
pub const MIN_ID: u32 = 1000;
/// `nobody`/`nogroup`: shared by every unprivileged daemon, never a person's.
pub const NOBODY: u32 = 65534;

/// `[lab]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Lab {
    /// Size of each user's home volume (a Kubernetes quantity, e.g. `10Gi`).
    #[serde(default = "default_home_size")]
    pub home_size: String,
    #[serde(default)]
    pub projects: Vec<Project>,
    #[serde(default)]
    pub users: Vec<LabUser>,
}

impl Default for Lab {
    fn default() -> Self {
        Lab { home_size: default_home_size(), projects: Vec::new(), users: Vec::new() }
    }
}

fn default_home_size() -> String {
    "5Gi".into()
}

/// `[[lab.projects]]`: a namespace of its own with the limits every kernel and notebook server in
/// it gets, and optionally a total for all of them together.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Project {
    /// Lowercase letters, digits and `-`, at most 40; its namespace is `lab-<name>`.
    pub name: String,
    /// CPUs one container requests at least (`0.5`, `500m`): what a kernel is guaranteed.
    pub cpu_min: String,
    /// CPUs one container may use at most: its limit, and the default limit.
    pub cpu_max: String,
    /// Memory one container requests at least (`256Mi`).
    pub memory_min: String,
    /// Memory one container may use at most (`512Mi`).
    pub memory_max: String,
    /// Total CPU limits of the project's containers together (none: no total).
    #[serde(default)]
    pub quota_cpu: Option<String>,
    /// Total memory limits of the project's containers together.
    #[serde(default)]
    pub quota_memory: Option<String>,
    /// Pods (kernels and notebook servers) the project may run at once.
    #[serde(default)]
    pub quota_pods: Option<u32>,
}

/// `[[lab.users]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LabUser {
    /// Login name: a lowercase letter, then lowercase letters, digits and `-`; at most 32.
    pub name: String,
    /// Fixed uid: every notebook server and kernel of this user runs as it, and owns the home.
    /// At least 1000; never 0 (root) nor 65534 (nobody); unique in the roster.
    pub uid: u32,
    /// Fixed gid (default: the uid).
    #[serde(default)]
    pub gid: Option<u32>,
    /// Projects this user may start servers and kernels in (at least one).
    pub projects: Vec<String>,
    /// Hub administrator: sees every user and may open their servers (JupyterHub's admin).
    #[serde(default)]
    pub admin: bool,
}

impl LabUser {
    pub fn gid(&self) -> u32 {
        self.gid.unwrap_or(self.uid)
    }
}

/// What templates see as `lab`: the roster checked, with quantities in one form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct LabView {
    /// Whether there is a roster at all (a stack without `[lab]` renders no projects).
    pub enabled: bool,
    /// Bytes, as a Kubernetes quantity.
    pub home_size: String,
    pub projects: Vec<ProjectView>,
    pub users: Vec<UserView>,
    /// Names of the hub administrators.
    pub admins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ProjectView {
    pub name: String,
    pub namespace: String,
    /// Millicores (`500m`).
    pub cpu_min: String,
    pub cpu_max: String,
    /// Bytes (`268435456`).
    pub memory_min: String,
    pub memory_max: String,
    /// As millicores and bytes; absent when the project sets no total.
    pub quota_cpu: Option<String>,
    pub quota_memory: Option<String>,
    pub quota_pods: Option<u32>,
    /// Names of the users who may run in it.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct UserView {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub projects: Vec<String>,
    /// Their projects' namespaces, in the same order.
    pub namespaces: Vec<String>,
    pub admin: bool,
}

impl Lab {
    /// Checks the roster; the first problem found is the error, naming the entry and what to do.
    pub fn validate(&self) -> Result<()> {
        self.view().map(|_| ())
    }

    /// The checked roster as templates see it.
    pub fn view(&self) -> Result<LabView> {
        // (A user names their projects, so users without any project are refused there.)
        let home = memory(&self.home_size).context("[lab] home-size")?;
        let mut projects = Vec::with_capacity(self.projects.len());
        let mut names = BTreeSet::new();
        for p in &self.projects {
            let at = format!("[[lab.projects]] {:?}", p.name);
            if !project_name(&p.name) {
                bail!("{at}: a project name is 1-40 lowercase letters, digits and '-' (its namespace is lab-<name>)");
            }
            if !names.insert(p.name.as_str()) {
                bail!("{at} is listed twice");
            }
            let cpu_min = cpu(&p.cpu_min).with_context(|| format!("{at}: cpu-min"))?;
            let cpu_max = cpu(&p.cpu_max).with_context(|| format!("{at}: cpu-max"))?;
            let mem_min = memory(&p.memory_min).with_context(|| format!("{at}: memory-min"))?;
            let mem_max = memory(&p.memory_max).with_context(|| format!("{at}: memory-max"))?;
            if cpu_min == 0 || mem_min == 0 {
                bail!("{at}: cpu-min and memory-min must be above zero (a kernel needs some of both)");
            }
            if cpu_min > cpu_max {
                bail!("{at}: cpu-min {} is above cpu-max {}", p.cpu_min, p.cpu_max);
            }
            if mem_min > mem_max {
                bail!("{at}: memory-min {} is above memory-max {}", p.memory_min, p.memory_max);
            }
            let quota_cpu = p.quota_cpu.as_deref().map(cpu).transpose().with_context(|| format!("{at}: quota-cpu"))?;
            let quota_mem =
                p.quota_memory.as_deref().map(memory).transpose().with_context(|| format!("{at}: quota-memory"))?;
            if quota_cpu.is_some_and(|q| q < cpu_max) {
                bail!("{at}: quota-cpu is below cpu-max: not even one kernel at its maximum would fit");
            }
            if quota_mem.is_some_and(|q| q < mem_max) {
                bail!("{at}: quota-memory is below memory-max: not even one kernel at its maximum would fit");
            }
            if p.quota_pods == Some(0) {
                bail!("{at}: quota-pods 0 would allow nothing; leave it out for no limit");
            }
            projects.push(ProjectView {
                name: p.name.clone(),
                namespace: project_namespace(&p.name),
                cpu_min: format!("{cpu_min}m"),
                cpu_max: format!("{cpu_max}m"),
                memory_min: mem_min.to_string(),
                memory_max: mem_max.to_string(),
                quota_cpu: quota_cpu.map(|q| format!("{q}m")),
                quota_memory: quota_mem.map(|q| q.to_string()),
                quota_pods: p.quota_pods,
                members: Vec::new(),
            });
        }
        let mut users = Vec::with_capacity(self.users.len());
        let mut seen_names = BTreeSet::new();
        let mut uids: BTreeMap<u32, &str> = BTreeMap::new();
        for u in &self.users {
            let at = format!("[[lab.users]] {:?}", u.name);
            if !user_name(&u.name) {
                bail!("{at}: a user name starts with a lowercase letter, then lowercase letters, digits and single '-'s, not at the end; at most 32");
            }
            if !seen_names.insert(u.name.as_str()) {
                bail!("{at} is listed twice");
            }
            for (what, id) in [("uid", u.uid), ("gid", u.gid())] {
                if id == 0 {
                    bail!("{at}: {what} 0 is root's; notebooks and kernels never run as root: give a {what} of {MIN_ID} or more");
                }
                if id < MIN_ID || id == NOBODY || id > i32::MAX as u32 {
                    bail!("{at}: {what} {id} is a system account's; give a {what} from {MIN_ID} up (not {NOBODY})");
                }
            }
            if let Some(other) = uids.insert(u.uid, &u.name) {
                bail!(
                    "{at}: uid {} is {other}'s too; two users with one uid own each other's files: give each their own",
                    u.uid
                );
            }
            if u.projects.is_empty() {
                bail!("{at}: in no project, so nothing could run; list at least one in projects");
            }
            let mut mine = BTreeSet::new();
            for p in &u.projects {
                let Some(pv) = projects.iter_mut().find(|pv| &pv.name == p) else {
                    let known: Vec<&str> = self.projects.iter().map(|p| p.name.as_str()).collect();
                    bail!(
                        "{at}: no project {p:?} in [[lab.projects]] (known: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    );
                };
                if !mine.insert(p.as_str()) {
                    bail!("{at}: project {p:?} is listed twice");
                }
                pv.members.push(u.name.clone());
            }
            users.push(UserView {
                name: u.name.clone(),
                uid: u.uid,
                gid: u.gid(),
                projects: u.projects.clone(),
                namespaces: u.projects.iter().map(|p| project_namespace(p)).collect(),
                admin: u.admin,
            });
        }
        Ok(LabView {
            enabled: !self.users.is_empty(),
            home_size: home.to_string(),
            admins: users.iter().filter(|u| u.admin).map(|u| u.name.clone()).collect(),
            projects,
            users,
        })
    }
}

fn project_name(s: &str) -> bool {
    s.len() <= 40 && crate::stack::valid_dns_label(s)
}

/// A user name the hub's KubeSpawner uses as it is in object names (`notebook-<name>`,
/// `home-<name>`), as the gateway's front and launcher do: it would hash a name with "--".
fn user_name(s: &str) -> bool {
    s.len() <= 32
        && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && !s.ends_with('-')
        && !s.contains("--")
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A CPU quantity in millicores: `1`, `0.5`, `250m`.
pub fn cpu(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, scale) = match t.strip_suffix('m') {
        Some(n) => (n, 1),
        None => (t, 1000),
    };
    let v = decimal(num, scale).with_context(|| format!("{s:?} is not a CPU quantity such as 0.5, 1 or 500m"))?;
    Ok(v)
}

/// A memory quantity in bytes: `512Mi`, `1Gi`, `1G`, `1048576`.
pub fn memory(s: &str) -> Result<u64> {
    let t = s.trim();
    const SUFFIXES: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
    ];
    let (num, scale) =
        SUFFIXES.iter().find_map(|(suf, scale)| t.strip_suffix(suf).map(|n| (n, *scale))).unwrap_or((t, 1));
    decimal(num, scale).with_context(|| format!("{s:?} is not a memory quantity such as 512Mi or 2Gi"))
}

/// `num` (digits with at most one `.`) times `scale`, refusing what does not come out whole.
fn decimal(num: &str, scale: u64) -> Result<u64> {
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) || whole.len() > 18 || frac.len() > 9 {
        bail!("not a number");
    }
    let w: u64 = if whole.is_empty() { 0 } else { whole.parse()? };
    let f: u128 = if frac.is_empty() { 0 } else { frac.parse()? };
    let denom = 10u128.pow(frac.len() as u32);
    // u128: nine fraction digits times a petabyte's scale still fits.
    let frac_scaled = f * scale as u128;
    if !frac_scaled.is_multiple_of(denom) {
        bail!("finer than the unit allows");
    }
    let frac_part = u64::try_from(frac_scaled / denom).context("too large")?;
    w.checked_mul(scale).and_then(|x| x.checked_add(frac_part)).context("too large")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(text: &str) -> Lab {
        toml::from_str(text).expect("a [lab] table")
    }

    const ROSTER: &str = r#"
        [[projects]]
        name = "p1"
        cpu-min = "0.5"
        cpu-max = "1"
        memory-min = "256Mi"
        memory-max = "512Mi"
        quota-cpu = "2"
        quota-memory = "1Gi"
        quota-pods = 4
        [[projects]]
        name = "p2"
        cpu-min = "1"
        cpu-max = "2"
        memory-min = "512Mi"
        memory-max = "2Gi"
        [[users]]
        name = "alice"
        uid = 2001
        projects = ["p1"]
        [[users]]
        name = "bob"
        uid = 2002
        gid = 3000
        projects = ["p2", "p1"]
        admin = true
    "#;

    #[test]
    fn quantities_come_out_in_millicores_and_bytes() {
        assert_eq!(cpu("0.5").unwrap(), 500);
        assert_eq!(cpu("500m").unwrap(), 500);
        assert_eq!(cpu("2").unwrap(), 2000);
        assert_eq!(cpu(".25").unwrap(), 250);
        assert!(cpu("0.0005").is_err(), "finer than a millicore");
        assert!(cpu("one").is_err());
        assert!(cpu("").is_err());
        assert!(cpu("-1").is_err());
        assert_eq!(memory("256Mi").unwrap(), 256 << 20);
        assert_eq!(memory("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(memory("1G").unwrap(), 1_000_000_000);
        assert_eq!(memory("4096").unwrap(), 4096);
        assert!(memory("12XB").is_err());
        assert_eq!(memory("1.5Pi").unwrap(), 3 << 49, "a fine fraction of a large unit does not overflow");
        assert!(memory("99999999999999999999Pi").is_err(), "overflow is an error, not a wrap");
    }

    #[test]
    fn roster_becomes_projects_with_members_and_canonical_limits() {
        let v = lab(ROSTER).view().unwrap();
        assert!(v.enabled);
        assert_eq!(v.admins, vec!["bob"]);
        let p1 = &v.projects[0];
        assert_eq!(p1.namespace, "lab-p1");
        assert_eq!((p1.cpu_min.as_str(), p1.cpu_max.as_str()), ("500m", "1000m"));
        assert_eq!((p1.memory_min.as_str(), p1.memory_max.as_str()), ("268435456", "536870912"));
        assert_eq!(p1.quota_cpu.as_deref(), Some("2000m"));
        assert_eq!(p1.quota_pods, Some(4));
        assert_eq!(p1.members, vec!["alice", "bob"]);
        assert_eq!(v.projects[1].members, vec!["bob"]);
        assert_eq!(v.projects[1].quota_memory, None);
        let bob = &v.users[1];
        assert_eq!((bob.uid, bob.gid), (2002, 3000));
        assert_eq!(v.users[0].gid, 2001, "gid defaults to the uid");
        assert_eq!(bob.namespaces, vec!["lab-p2", "lab-p1"]);
        assert_eq!(v.home_size, (5u64 << 30).to_string());
        assert!(!Lab::default().view().unwrap().enabled, "no roster, no projects");
    }

    fn refused(edit: impl Fn(&mut Lab)) -> String {
        let mut l = lab(ROSTER);
        edit(&mut l);
        format!("{:#}", l.view().expect_err("refused"))
    }

    #[test]
    fn root_system_ids_and_shared_uids_are_refused() {
        let e = refused(|l| l.users[0].uid = 0);
        assert!(e.contains("\"alice\"") && e.contains("uid 0 is root's"), "{e}");
        let e = refused(|l| l.users[1].gid = Some(0));
        assert!(e.contains("gid 0 is root's"), "{e}");
        let e = refused(|l| l.users[0].uid = 33);
        assert!(e.contains("system account"), "{e}");
        let e = refused(|l| l.users[0].uid = NOBODY);
        assert!(e.contains("system account"), "{e}");
        let e = refused(|l| l.users[1].uid = 2001);
        assert!(e.contains("uid 2001 is alice's too"), "{e}");
    }

    #[test]
    fn limits_that_could_not_hold_and_unknown_names_are_refused() {
        let e = refused(|l| l.projects[0].cpu_min = "2".into());
        assert!(e.contains("\"p1\"") && e.contains("cpu-min 2 is above cpu-max 1"), "{e}");
        let e = refused(|l| l.projects[0].memory_max = "128Mi".into());
        assert!(e.contains("memory-min 256Mi is above memory-max 128Mi"), "{e}");
        let e = refused(|l| l.projects[0].quota_cpu = Some("500m".into()));
        assert!(e.contains("quota-cpu is below cpu-max"), "{e}");
        let e = refused(|l| l.projects[0].memory_min = "lots".into());
        assert!(e.contains("memory-min") && e.contains("not a memory quantity"), "{e:#}");
        let e = refused(|l| l.users[0].projects = vec!["p9".into()]);
        assert!(e.contains("no project \"p9\"") && e.contains("known: p1, p2"), "{e}");
        let e = refused(|l| l.users[0].projects.clear());
        assert!(e.contains("in no project"), "{e}");
        let e = refused(|l| l.users[0].name = "Alice".into());
        assert!(e.contains("lowercase"), "{e}");
        let e = refused(|l| l.users[0].name = "ann--marie".into());
        assert!(e.contains("single '-'s"), "{e}");
        let e = refused(|l| l.projects[1].name = "p1".into());
        assert!(e.contains("listed twice"), "{e}");
        let e = refused(|l| l.projects[0].name = "a_b".into());
        assert!(e.contains("lab-<name>"), "{e}");
        let e = refused(|l| l.projects.clear());
        assert!(e.contains("no project \"p1\"") && e.contains("known: none"), "{e}");
    }
}
