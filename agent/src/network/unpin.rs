//! Giving a pinned address back: `labforge-agent network --unpin MAC` on the master, for a PC
//! that left the room for good (replaced, moved to another lab). A pin lasts for ever
//! otherwise, so kubeadm's pinned node IPs never change; a room that replaces PCs would
//! otherwise fill its pool with the dead ones.
//!
//! The serving task owns the pins (it holds them in memory and rewrites them), so the command
//! does not touch them: it leaves a request in a root-only directory on the state partition
//! and waits for the task's answer beside it. The task refuses a MAC that is not pinned, and
//! one whose address is a node of the cluster now (its beacons are heard): unpinning it
//! would let the next lease give it another address under kubeadm's feet.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::addressing::{Pins, LEASES_FILE};

/// Requests and answers, under the state directory (mode 0700).
pub const DIR: &str = "lan-unpin";
/// Requests at most looked at per round: a flood of files is not a way to stall the task.
const MAX_REQUESTS: usize = 16;

/// `aa:bb:cc:dd:ee:ff`, lowercase, from what a user typed (`-` or `:` separated, any case).
pub fn normalize_mac(s: &str) -> Result<String> {
    let mac = crate::network::dhcp::parse_mac(&s.trim().replace('-', ":"))
        .with_context(|| format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    Ok(crate::network::dhcp::format_mac(&mac))
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

/// What the task decides for one MAC: the address it frees, or why not.
pub fn decide(pins: &Pins, mac: &str, members: &[Ipv4Addr]) -> Result<Ipv4Addr, String> {
    let Some(pin) = pins.leases.get(mac) else {
        let known: Vec<&str> = pins.leases.keys().map(String::as_str).collect();
        return Err(format!(
            "{mac} is not pinned (pinned: {}); nothing changed",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ));
    };
    if members.contains(&pin.address) {
        return Err(format!(
            "{mac} holds {}, a node of the cluster now: power it off (or take it out of the room) first; nothing changed",
            pin.address
        ));
    }
    Ok(pin.address)
}

/// dnsmasq's lease file without `macs`' leases (so the freed address is not leased back to
/// the same MAC from dnsmasq's memory of it).
pub fn drop_leases(text: &str, macs: &[String]) -> String {
    text.lines()
        .filter(|l| {
            let mac = l.split_whitespace().nth(1).and_then(|m| normalize_mac(m).ok());
            !mac.is_some_and(|m| macs.contains(&m))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The requests waiting, by MAC (a file named after it); unreadable names are answered as
/// such and removed.
pub fn pending(state_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten().take(MAX_REQUESTS * 4) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(mac) = name.strip_suffix(".request") else { continue };
        match normalize_mac(mac) {
            Ok(m) if m == mac => out.push(m),
            _ => {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if out.len() == MAX_REQUESTS {
            break;
        }
    }
    out.sort();
    out
}

/// The task's answer to `mac`'s request: `done` or `refused`, with a line for the command.
pub fn answer(state_dir: &Path, mac: &str, outcome: &Result<Ipv4Addr, String>) -> Result<()> {
    let d = dir(state_dir);
    let (kind, line) = match outcome {
        Ok(addr) => ("done", format!("unpinned {mac}: {addr} is free for the next node that asks")),
        Err(why) => ("refused", why.clone()),
    };
    crate::sys::fs::write_durable_mode(&d.join(format!("{mac}.{kind}")), format!("{line}\n").as_bytes(), 0o600)?;
    let _ = std::fs::remove_file(d.join(format!("{mac}.request")));
    Ok(())
}

/// Frees the pins of `macs` in `pins` and in dnsmasq's lease file under `state_dir`; the caller
/// has stopped dnsmasq (it rewrites its lease file) and starts it again after.
pub fn apply(state_dir: &Path, pins: &mut Pins, macs: &[String]) -> Result<()> {
    for m in macs {
        pins.leases.remove(m);
    }
    pins.save(state_dir)?;
    let leases = state_dir.join(LEASES_FILE);
    match std::fs::read(&leases) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b[..b.len().min(1 << 20)]).into_owned();
            crate::sys::fs::write_durable_mode(&leases, drop_leases(&text, macs).as_bytes(), 0o644)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", leases.display())),
    }
    Ok(())
}

/// The command's side: leaves the request and waits up to `within` for the answer.
pub fn request(state_dir: &Path, mac: &str, within: Duration) -> Result<String> {
    let mac = normalize_mac(mac)?;
    let d = dir(state_dir);
    crate::sys::fs::dir_with_mode(&d, 0o700)?;
    for kind in ["done", "refused"] {
        let _ = std::fs::remove_file(d.join(format!("{mac}.{kind}")));
    }
    let req = d.join(format!("{mac}.request"));
    crate::sys::fs::write_durable_mode(&req, b"", 0o600)?;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        for (kind, ok) in [("done", true), ("refused", false)] {
            let path = d.join(format!("{mac}.{kind}"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                let _ = std::fs::remove_file(&path);
                if ok {
                    return Ok(text.trim().to_string());
                }
                bail!("{}", text.trim());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(&req);
    bail!(
        "no answer within {} s: only the master serving a bare switch's LAN holds pins (see `labforge-agent network`); nothing changed",
        within.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::addressing::Pin;

    fn pins() -> Pins {
        let mut p = Pins::default();
        p.leases
            .insert("52:54:00:00:00:01".into(), Pin { address: "10.83.0.5".parse().unwrap(), hostname: "a".into() });
        p.leases
            .insert("52:54:00:00:00:02".into(), Pin { address: "10.83.0.6".parse().unwrap(), hostname: "b".into() });
        p
    }

    #[test]
    fn a_mac_is_written_any_way_and_stored_one_way() {
        assert_eq!(normalize_mac("52-54-00-AA-bb-0C").unwrap(), "52:54:00:aa:bb:0c");
        let e = normalize_mac("52:54:00").unwrap_err().to_string();
        assert!(e.contains("is not a MAC address"), "{e}");
        assert!(normalize_mac("../../etc/passwd").is_err());
    }

    #[test]
    fn only_a_pinned_mac_that_is_not_in_the_cluster_is_freed() {
        let p = pins();
        let members = ["10.83.0.6".parse().unwrap()];
        assert_eq!(decide(&p, "52:54:00:00:00:01", &members), Ok("10.83.0.5".parse().unwrap()));
        let e = decide(&p, "52:54:00:00:00:02", &members).unwrap_err();
        assert!(e.contains("holds 10.83.0.6, a node of the cluster now") && e.contains("nothing changed"), "{e}");
        let e = decide(&p, "52:54:00:00:00:09", &members).unwrap_err();
        assert!(e.contains("is not pinned (pinned: 52:54:00:00:00:01, 52:54:00:00:00:02)"), "{e}");
    }

    #[test]
    fn the_freed_mac_leaves_the_pins_and_dnsmasqs_leases() {
        let d = tempfile::tempdir().unwrap();
        let mut p = pins();
        p.save(d.path()).unwrap();
        std::fs::write(
            d.path().join(LEASES_FILE),
            "0 52:54:00:00:00:01 10.83.0.5 a 01:52:54:00:00:00:01\n0 52:54:00:00:00:02 10.83.0.6 b *\n",
        )
        .unwrap();
        apply(d.path(), &mut p, &["52:54:00:00:00:01".to_string()]).unwrap();
        assert_eq!(Pins::load(d.path()).unwrap().leases.keys().collect::<Vec<_>>(), ["52:54:00:00:00:02"]);
        let leases = std::fs::read_to_string(d.path().join(LEASES_FILE)).unwrap();
        assert_eq!(leases, "0 52:54:00:00:00:02 10.83.0.6 b *\n");
    }

    #[test]
    fn a_request_is_answered_through_the_state_directory() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().to_path_buf();
        // The serving task's side, in a thread: it answers the one request it finds.
        let task = {
            let state = state.clone();
            std::thread::spawn(move || {
                let p = pins();
                for _ in 0..100 {
                    let reqs = pending(&state);
                    if let Some(mac) = reqs.first() {
                        answer(&state, mac, &decide(&p, mac, &[])).unwrap();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                panic!("no request came");
            })
        };
        let line = request(&state, "52-54-00-00-00-01", Duration::from_secs(10)).unwrap();
        task.join().unwrap();
        assert_eq!(line, "unpinned 52:54:00:00:00:01: 10.83.0.5 is free for the next node that asks");
        assert!(pending(&state).is_empty());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(state.join(DIR)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700, "root's alone");
        // Nobody serving: a clear answer, and no request left behind.
        let e = request(&state, "52:54:00:00:00:02", Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("only the master serving a bare switch's LAN holds pins"), "{e}");
        assert!(pending(&state).is_empty());
    }
}
