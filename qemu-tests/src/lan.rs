//! A private LAN for VMs: a network namespace made by the test, a bridge in it, one tap per
//! VM and dnsmasq handing out DHCP leases on the bridge — or no DHCP server at all (a bare
//! switch, [`Lan::bare`]). Nothing leaves the namespace.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

pub const SUBNET: &str = "10.77.0";
/// The test host's own address on a bare switch (the master takes `.1`).
pub const BARE_HOST: &str = "10.77.0.254";
/// The test host on "the building network" ([`Lan::outside`]).
pub const OUTSIDE_HOST: &str = "192.168.200.1";
/// What `http://www.outside.test:8080/hello` says.
pub const OUTSIDE_HELLO: &str = "hello-from-outside";

/// A TCP connection attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tcp {
    Open,
    Refused,
    Silent,
}

pub struct Lan {
    pub ns: String,
    dnsmasq: Option<Child>,
    /// The outside's DHCP/DNS server and web server ([`Lan::outside`]).
    outside: Vec<Child>,
    outside_taps: usize,
    taps: usize,
    pub dir: PathBuf,
}

/// Starts a server in the background, its output discarded (each keeps its own log).
fn spawn(mut cmd: Command, what: &str) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Lan {
    /// A LAN with the test's dnsmasq serving DHCP from `SUBNET.10` (the bridge is `SUBNET.1`).
    pub fn new(name: &str, dir: &Path) -> Result<Lan> {
        Lan::make(name, dir, true)
    }

    /// A bare switch: no DHCP server; the bridge (the test's host on the LAN) is
    /// [`BARE_HOST`], so the test reaches nodes on `SUBNET.0/24` once a master serves it.
    pub fn bare(name: &str, dir: &Path) -> Result<Lan> {
        Lan::make(name, dir, false)
    }

    fn make(name: &str, dir: &Path, dhcp: bool) -> Result<Lan> {
        sweep_stale_namespaces();
        let ns = format!("lf-{}-{}", std::process::id(), name.chars().take(12).collect::<String>());
        ip(&["netns", "add", &ns])?;
        let mut lan = Lan {
            ns: ns.clone(),
            dnsmasq: None,
            outside: Vec::new(),
            outside_taps: 0,
            taps: 0,
            dir: dir.to_path_buf(),
        };
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let host = if dhcp { format!("{SUBNET}.1") } else { BARE_HOST.to_string() };
        lan.bridge("br0", &host)?;
        if !dhcp {
            return Ok(lan);
        }
        let mut dnsmasq = lan.command("dnsmasq");
        dnsmasq
            .args(["--keep-in-foreground", "--conf-file=/dev/null", "--port=0"])
            .args(["--interface=br0", "--bind-interfaces", "--log-dhcp"])
            .arg(format!("--dhcp-range={SUBNET}.10,{SUBNET}.200,255.255.255.0,12h"))
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .arg(format!("--log-facility={}", dir.join("dnsmasq.log").display()))
            .arg("--pid-file");
        lan.dnsmasq = Some(spawn(dnsmasq, "dnsmasq (apt-get install dnsmasq-base)")?);
        Ok(lan)
    }

    /// Bridge `name` in the namespace, up, with the test's host on it at `host`/24.
    fn bridge(&self, name: &str, host: &str) -> Result<()> {
        ip(&["-n", &self.ns, "link", "add", name, "type", "bridge"])?;
        ip(&["-n", &self.ns, "addr", "add", &format!("{host}/24"), "dev", name])?;
        ip(&["-n", &self.ns, "link", "set", name, "up"])
    }

    /// A new tap on the bridge, for one VM.
    pub fn tap(&mut self) -> Result<String> {
        let name = format!("tap{}", self.taps);
        self.taps += 1;
        self.tap_on(name, "br0")
    }

    /// Tap `name`, made and enslaved to `bridge`.
    fn tap_on(&self, name: String, bridge: &str) -> Result<String> {
        ip(&["-n", &self.ns, "tuntap", "add", "dev", &name, "mode", "tap"])?;
        ip(&["-n", &self.ns, "link", "set", &name, "master", bridge])?;
        ip(&["-n", &self.ns, "link", "set", &name, "up"])?;
        Ok(name)
    }

    /// "The building network", a second segment (bridge `br1`) in the same namespace, for a
    /// master's uplink: the test's host on it is [`OUTSIDE_HOST`], with dnsmasq handing out
    /// leases and answering `www.outside.test`, and a web server on port 8080 serving
    /// `/hello` ([`OUTSIDE_HELLO`]). The namespace does not forward between the segments:
    /// the LAN reaches it only through the master.
    pub fn outside(&mut self) -> Result<()> {
        self.bridge("br1", OUTSIDE_HOST)?;
        let www = self.dir.join("outside-www");
        fs::create_dir_all(&www)?;
        fs::write(www.join("hello"), format!("{OUTSIDE_HELLO}\n"))?;
        let mut dnsmasq = self.command("dnsmasq");
        dnsmasq
            .args(["--keep-in-foreground", "--conf-file=/dev/null"])
            .args(["--interface=br1", "--bind-interfaces", "--except-interface=lo", "--no-hosts", "--no-resolv"])
            .arg("--dhcp-range=192.168.200.50,192.168.200.99,255.255.255.0,12h")
            .arg(format!("--host-record=www.outside.test,{OUTSIDE_HOST}"))
            .arg(format!("--dhcp-leasefile={}", self.dir.join("outside.leases").display()))
            .arg(format!("--log-facility={}", self.dir.join("outside-dnsmasq.log").display()))
            .arg("--pid-file");
        self.outside.push(spawn(dnsmasq, "dnsmasq for the outside (apt-get install dnsmasq-base)")?);
        let mut httpd = self.command("busybox");
        httpd.args(["httpd", "-f", "-p", &format!("{OUTSIDE_HOST}:8080"), "-h"]).arg(&www);
        self.outside.push(spawn(httpd, "busybox httpd for the outside (apt-get install busybox-static)")?);
        Ok(())
    }

    /// A new tap on the outside's bridge, for a master's uplink NIC.
    pub fn outside_tap(&mut self) -> Result<String> {
        let name = format!("up{}", self.outside_taps);
        self.outside_taps += 1;
        self.tap_on(name, "br1")
    }

    /// Whether TCP `port` at `address` answers from inside the namespace: connected, refused
    /// (a host that is there and says no), or silent within 5 s (dropped on the way).
    pub fn tcp(&self, address: &str, port: u16) -> Result<Tcp> {
        let out = self
            .command("timeout")
            .args(["5", "bash", "-c", &format!("exec 3<>/dev/tcp/{address}/{port}")])
            .output()
            .context("running bash in the namespace")?;
        let err = String::from_utf8_lossy(&out.stderr);
        Ok(match out.status.code() {
            Some(0) => Tcp::Open,
            Some(124) => Tcp::Silent,
            _ if err.contains("refused") => Tcp::Refused,
            _ => bail!("tcp {address}:{port}: {err}"),
        })
    }

    /// Broadcasts one DHCPDISCOVER on the bridge (the agent's own probe) and returns the
    /// servers that offered an address.
    /// Under TCG a busy guest may answer later than the probe listens (3 s): a probe that no
    /// server answered is tried again, twice.
    pub fn dhcp_servers(&self) -> Result<Vec<String>> {
        for _ in 0..2 {
            let servers = self.dhcp_probe()?;
            if !servers.is_empty() {
                return Ok(servers);
            }
        }
        self.dhcp_probe()
    }

    fn dhcp_probe(&self) -> Result<Vec<String>> {
        let bin = crate::workspace_root().join("target/release/labforge-agent");
        let out = self.command(bin.to_str().expect("utf-8 path")).args(["network", "--probe", "br0"]).output()?;
        if !out.status.success() {
            bail!("DHCP probe failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let offers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        let mut servers: Vec<String> = offers.iter().filter_map(|o| o["server"].as_str().map(str::to_string)).collect();
        servers.sort();
        servers.dedup();
        Ok(servers)
    }

    /// Resolves `name` through the DNS server at `server`, from inside the namespace (the
    /// system resolver, pointed there by `ip netns exec`'s per-namespace resolv.conf).
    pub fn resolve(&self, server: &str, name: &str) -> Result<Option<String>> {
        let etc = PathBuf::from("/etc/netns").join(&self.ns);
        fs::create_dir_all(&etc)?;
        fs::write(etc.join("resolv.conf"), format!("nameserver {server}\noptions timeout:2 attempts:2\n"))?;
        let out = self.command("getent").args(["ahostsv4", name]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().map(str::to_string))
    }

    /// `cmd` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for mut c in self.dnsmasq.take().into_iter().chain(self.outside.drain(..)) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.ns));
    }
}

/// Deletes namespaces left by test processes that were killed before they could clean up
/// (their names carry the pid of a process that no longer exists).
fn sweep_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else { continue };
        let Some(pid) = ns.strip_prefix("lf-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // Whatever still runs inside (a dnsmasq, a VM) goes with it.
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    let _ = Command::new("kill").arg(p).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
    }
}

/// A config partition as a user would put on a stick: FAT, label `LABFORGE`, with
/// `labforge.toml` and/or `cluster.secret`.
pub fn config_partition(path: &Path, labforge_toml: Option<&str>, secret: Option<&str>) -> Result<()> {
    let _ = fs::remove_file(path);
    let run = |c: &mut Command| -> Result<()> {
        let out = c.output().with_context(|| format!("running {c:?}"))?;
        if !out.status.success() {
            bail!("{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(Command::new("mkfs.vfat").args(["-n", "LABFORGE", "-C"]).arg(path).arg("8192"))?;
    let dir = tempfile::tempdir()?;
    for (name, text) in [("labforge.toml", labforge_toml), ("cluster.secret", secret)] {
        if let Some(t) = text {
            let f = dir.path().join(name);
            fs::write(&f, t)?;
            run(Command::new("mcopy").arg("-i").arg(path).arg(&f).arg(format!("::{name}")))?;
        }
    }
    Ok(())
}

/// A copy of the disk image `image` at `path` with a `LABFORGE` config partition added after
/// its last partition (as a user adds one to a flashed stick), carrying `labforge.toml` and/or
/// `cluster.secret`: the agent reads config partitions only on the medium it booted from.
/// The copy is sparse; the GPT's backup header moves to the new end.
pub fn boot_disk_with_config(
    image: &Path,
    path: &Path,
    labforge_toml: Option<&str>,
    secret: Option<&str>,
) -> Result<PathBuf> {
    const PART: u64 = 16 << 20;
    let run = |c: &mut Command, input: Option<&str>| -> Result<String> {
        use std::io::Write;
        let mut child = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {c:?}"))?;
        if let Some(text) = input {
            child.stdin.take().expect("stdin").write_all(text.as_bytes())?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let _ = fs::remove_file(path);
    run(Command::new("cp").arg("--sparse=always").arg(image).arg(path), None)?;
    let f = fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(f.metadata()?.len() + PART + (1 << 20))?;
    drop(f);
    run(Command::new("sfdisk").args(["--quiet", "--relocate", "gpt-bak-std"]).arg(path), None)?;
    // Microsoft basic data: what a FAT partition on a stick is typed as.
    let script = "size=16MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=\"LABFORGE\"\n";
    run(
        Command::new("sfdisk").args(["--quiet", "--append", "--no-reread", "--no-tell-kernel"]).arg(path),
        Some(script),
    )?;
    let table: serde_json::Value = serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(path), None)?)?;
    let start = table["partitiontable"]["partitions"]
        .as_array()
        .and_then(|p| p.last())
        .and_then(|p| p["start"].as_u64())
        .context("the new partition's start")?;
    let fat = path.with_extension("config.img");
    config_partition(&fat, labforge_toml, secret)?;
    let bytes = fs::read(&fat)?;
    anyhow::ensure!(bytes.len() as u64 <= PART, "the config filesystem is larger than its partition");
    let f = fs::OpenOptions::new().write(true).open(path)?;
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes, start * 512)?;
    f.sync_all()?;
    fs::remove_file(&fat)?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_partition_is_added_after_the_last_one() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("image.raw");
        fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
        let mut sfdisk = Command::new("sfdisk").args(["--quiet"]).arg(&image).stdin(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        sfdisk.stdin.take().unwrap().write_all(b"label: gpt\nsize=8MiB\nsize=8MiB\nsize=+\n").unwrap();
        assert!(sfdisk.wait().unwrap().success());
        let disk = boot_disk_with_config(&image, &d.path().join("boot.raw"), Some("hostname = \"x\"\n"), None).unwrap();
        let table: serde_json::Value =
            serde_json::from_slice(&Command::new("sfdisk").arg("--json").arg(&disk).output().unwrap().stdout).unwrap();
        let parts = table["partitiontable"]["partitions"].as_array().unwrap().clone();
        assert_eq!(parts.len(), 4, "{parts:?}");
        assert_eq!(parts[3]["name"], "LABFORGE");
        let start = parts[3]["start"].as_u64().unwrap() * 512;
        let listing = Command::new("mdir").arg("-i").arg(format!("{}@@{start}", disk.display())).output().unwrap();
        assert!(String::from_utf8_lossy(&listing.stdout).contains("labforge.toml"), "{listing:?}");
        // The image itself is untouched.
        assert_eq!(fs::metadata(&image).unwrap().len(), 64 << 20);
    }
}
