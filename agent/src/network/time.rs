//! Time on the cluster LAN. Beacons and join requests are only accepted within two minutes
//! of the receiver's clock, so a PC whose clock is off hears nobody. chrony keeps clocks
//! together: the master serves time to the LAN (and keeps its own upstream pool, when it has a
//! way out); every other node takes its time from the master; a node that hears only stale,
//! authentic beacons from a committed master takes its time from that master, which is how a
//! PC with a dead clock battery finds its way into the cluster. What to do is decided by
//! [`plan`]; it is applied as `/etc/chrony/conf.d/labforge.conf` and a restart of chrony.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cluster::ClusterView;
use crate::report::Report;
use crate::sys::Cmd;

/// chrony's drop-in directory (Debian's chrony.conf reads `confdir /etc/chrony/conf.d`).
pub const CONF: &str = "/etc/chrony/conf.d/labforge.conf";

/// Where this node takes its time from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum TimeSource {
    /// chrony as the image has it (its own pool, if any).
    Default,
    /// The master: serves time to `allow` (the LAN), and keeps time itself when nothing
    /// upstream answers.
    Serve { allow: String },
    /// Takes time from the master at `server`.
    Follow { server: Ipv4Addr },
}

/// The time part of `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeStatus {
    #[serde(flatten)]
    pub source: TimeSource,
    pub message: String,
}

/// Where to take time from: the master serves it; a follower takes it from its master; a node
/// with no master that hears a committed master only through stale beacons takes it from that
/// master (`skewed_master`).
pub fn plan(
    leading: bool,
    lan: Option<(Ipv4Addr, Ipv4Addr)>,
    master: Option<Ipv4Addr>,
    skewed_master: Option<Ipv4Addr>,
) -> TimeSource {
    match (leading, lan, master.or(skewed_master)) {
        (true, Some((address, netmask)), _) => {
            let network = Ipv4Addr::from(u32::from(address) & u32::from(netmask));
            TimeSource::Serve { allow: format!("{network}/{}", u32::from(netmask).count_ones()) }
        }
        (false, Some((address, _)), Some(server)) if server != address => TimeSource::Follow { server },
        _ => TimeSource::Default,
    }
}

/// chrony's drop-in for `source` (none for [`TimeSource::Default`]).
pub fn conf(source: &TimeSource) -> Option<String> {
    let head = "# Written by labforge-agent (network::time); replaced when this node's place in the cluster changes.\n";
    match source {
        TimeSource::Default => None,
        // Stratum 10 when nothing upstream answers: the LAN's clocks agree with each other,
        // which is what the cluster needs.
        TimeSource::Serve { allow } => Some(format!("{head}allow {allow}\nlocal stratum 10 orphan\n")),
        // chrony restarts with it, so the image's `makestep` lets its first updates step the
        // clock however far off it is.
        TimeSource::Follow { server } => Some(format!("{head}server {server} iburst\n")),
    }
}

/// Keeps chrony pointed where [`plan`] says, checking every few seconds.
pub async fn run(report: Report, mut view: watch::Receiver<ClusterView>) -> Result<()> {
    let mut applied: Option<TimeSource> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = view.changed() => if changed.is_err() { return Ok(()) },
        }
        let (leading, lan) = {
            let v = view.borrow();
            (v.leading, v.lan.as_ref().map(|l| (l.address, l.netmask)))
        };
        let master = report.snapshot().master_address.and_then(|a| a.parse().ok());
        let skewed = report.tally().beacons.skew.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let skewed_master = skewed.and_then(|s| s.committed_master);
        let want = plan(leading, lan, master, skewed_master);
        if applied.as_ref() == Some(&want) {
            continue;
        }
        let source = want.clone();
        let message = match crate::sys::blocking(move || apply(&source)).await {
            Ok(m) => {
                applied = Some(want.clone());
                m
            }
            Err(e) => {
                warn!("time: {e:#}");
                format!("{e:#}")
            }
        };
        report.update(|s| s.time = Some(TimeStatus { source: want, message }));
    }
}

fn apply(source: &TimeSource) -> Result<String> {
    if !Path::new("/usr/sbin/chronyd").exists() {
        return Ok("chrony is not in this image: time is not synchronised".into());
    }
    match conf(source) {
        Some(text) => {
            if let Some(dir) = Path::new(CONF).parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            crate::sys::fs::write_durable(Path::new(CONF), text.as_bytes())?
        }
        None => match std::fs::remove_file(CONF) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok("chrony as the image has it".into()),
            Err(e) => return Err(e).with_context(|| format!("removing {CONF}")),
        },
    }
    Cmd::new("systemctl").args(["restart", "chrony.service"]).run().context("restarting chrony")?;
    let said = match source {
        TimeSource::Default => "chrony as the image has it".to_string(),
        TimeSource::Serve { allow } => format!("serving time to {allow}"),
        TimeSource::Follow { server } => format!("taking time from the master at {server}"),
    };
    info!("time: {said}");
    Ok(said)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_serves_followers_follow_and_a_lost_clock_finds_the_master() {
        let lan = Some((Ipv4Addr::new(10, 77, 0, 23), Ipv4Addr::new(255, 255, 255, 0)));
        let m = Ipv4Addr::new(10, 77, 0, 5);
        assert_eq!(plan(true, lan, None, None), TimeSource::Serve { allow: "10.77.0.0/24".into() });
        assert_eq!(plan(true, lan, Some(m), Some(m)), TimeSource::Serve { allow: "10.77.0.0/24".into() });
        assert_eq!(plan(false, lan, Some(m), None), TimeSource::Follow { server: m });
        assert_eq!(plan(false, lan, None, Some(m)), TimeSource::Follow { server: m });
        assert_eq!(plan(false, lan, None, None), TimeSource::Default);
        assert_eq!(plan(false, None, Some(m), None), TimeSource::Default, "no LAN yet");
        assert_eq!(plan(false, lan, Some(Ipv4Addr::new(10, 77, 0, 23)), None), TimeSource::Default, "not from itself");
        let c = conf(&TimeSource::Follow { server: m }).unwrap();
        assert!(c.contains("server 10.77.0.5 iburst"), "{c}");
        let c = conf(&TimeSource::Serve { allow: "10.77.0.0/24".into() }).unwrap();
        assert!(c.contains("allow 10.77.0.0/24") && c.contains("local stratum 10"), "{c}");
        assert_eq!(conf(&TimeSource::Default), None);
    }
}
