//! `/etc/hosts` entries the agent owns: the API endpoint's name mapped to the master, one line
//! marked as ours, replaced durably on change.

use std::path::Path;

use anyhow::{Context, Result};

use crate::sys::fs::write_durable;

const HOSTS_MARK: &str = "# labforge";

/// Points `host` at `ip` in /etc/hosts (one line, marked as ours, replaced on change).
pub fn set_hosts_entry(hosts: &Path, host: &str, ip: &str) -> Result<()> {
    // A file that cannot be read is an error, never silently replaced.
    let text = match std::fs::read_to_string(hosts) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", hosts.display())),
    };
    let line = format!("{ip} {host} {HOSTS_MARK}");
    if text.lines().any(|l| l == line) {
        return Ok(());
    }
    let mut out: String = text
        .lines()
        .filter(|l| !(l.ends_with(HOSTS_MARK) && l.split_whitespace().nth(1) == Some(host)))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&line);
    out.push('\n');
    write_durable(hosts, out.as_bytes()).with_context(|| format!("updating {}", hosts.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn hosts_entry_is_added_then_replaced() {
        let d = tempfile::tempdir().unwrap();
        let hosts = d.path().join("hosts");
        fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        set_hosts_entry(&hosts, "lab-api", "10.0.0.2").unwrap();
        set_hosts_entry(&hosts, "lab-api", "10.0.0.2").unwrap();
        assert_eq!(fs::read_to_string(&hosts).unwrap(), "127.0.0.1 localhost\n10.0.0.2 lab-api # labforge\n");
        set_hosts_entry(&hosts, "lab-api", "10.0.0.3").unwrap();
        assert_eq!(fs::read_to_string(&hosts).unwrap(), "127.0.0.1 localhost\n10.0.0.3 lab-api # labforge\n");
    }
}
