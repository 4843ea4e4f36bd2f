//! One QEMU virtual machine: UEFI (OVMF) firmware, disks as throw-away qcow2 overlays, the
//! serial console captured line by line to a log file and to the test.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use labforge_agent::status::{Status, CONSOLE_PREFIX};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// `kvm` if a tiny firmware boot works with it here, else `tcg,thread=single`. KVM exists on our
/// CI machines but fails with emulation errors, so it is never assumed.
/// `LABFORGE_QEMU_ACCEL` overrides the probe.
pub fn accel() -> &'static str {
    static ACCEL: OnceLock<String> = OnceLock::new();
    ACCEL.get_or_init(|| {
        if let Ok(a) = std::env::var("LABFORGE_QEMU_ACCEL") {
            return a;
        }
        let ok = probe_kvm().unwrap_or(false);
        // Single-threaded TCG: with one vCPU per VM it costs nothing. (Guests that looked
        // stalled under multi-threaded TCG were idle and healthy: systemd had stopped printing
        // status lines once the serial getty held the console.)
        let chosen = if ok { "kvm" } else { "tcg,thread=single" };
        eprintln!("qemu-tests: using accelerator {chosen}");
        chosen.to_string()
    })
}

fn probe_kvm() -> Result<bool> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(false);
    }
    let dir = tempfile::tempdir()?;
    let vars = dir.path().join("vars.fd");
    fs::copy(OVMF_VARS, &vars)?;
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-M", "q35", "-m", "256", "-nodefaults", "-display", "none", "-serial", "stdio"])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let (tx, rx) = mpsc::channel();
    forward_lines(child.stdout.take().expect("piped"), tx.clone(), "", None);
    forward_lines(child.stderr.take().expect("piped"), tx.clone(), "", None);
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(20);
    let verdict = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l)
                if l.contains("emulation failure")
                    || l.contains("KVM internal error")
                    || l.contains("failed to initialize kvm") =>
            {
                break false
            }
            // OVMF's boot manager speaks once the firmware has run: KVM works.
            Ok(l) if l.contains("BdsDxe") || l.contains("UEFI") => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    Ok(verdict)
}

/// Where a scenario keeps its files: `target/qemu-tests/<scenario>/`.
pub fn scenario_dir(name: &str) -> Result<PathBuf> {
    let dir = crate::workspace_root().join("target/qemu-tests").join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Base images; each gets a fresh qcow2 overlay, so the base is never written.
    pub disks: Vec<PathBuf>,
    /// Grow the first disk's overlay by this much (the state partition should fill it).
    pub grow_first_disk: Option<u64>,
    /// The VM's network.
    pub net: Net,
    /// Serial number of the first disk (gives it a `/dev/disk/by-id/virtio-<serial>` name).
    pub os_serial: Option<String>,
    /// Raw disk files attached as they are (no overlay): the test owns them and reads them
    /// after the VM is gone.
    pub extra_disks: Vec<ExtraDisk>,
    /// The NIC's place in the firmware's boot order (its iPXE ROM): `Some(0)` boots from the
    /// network first, as a diskless PC does; `None`: the NIC is not a boot device.
    pub net_boot: Option<u32>,
    /// Netboot with the firmware's own PXE client (OVMF's network stack) instead of the NIC's
    /// iPXE option ROM, as PCs whose firmware has no iPXE do: the NIC gets no ROM.
    pub firmware_pxe: bool,
    /// The VM's clock is this far from the host's (a PC whose BIOS clock is off).
    pub clock_offset_secs: i64,
    /// A second NIC (tap, MAC) in the same namespace as `net`'s: a master's uplink to the
    /// building network.
    pub uplink: Option<(String, String)>,
}

/// A raw disk file attached to a VM directly.
#[derive(Debug, Clone)]
pub struct ExtraDisk {
    pub path: PathBuf,
    /// Device serial: the guest sees `/dev/disk/by-id/virtio-<serial>` (or `usb-…<serial>…`).
    pub serial: String,
    /// Attach as a USB stick (`usb-storage` on an xHCI controller) instead of virtio.
    pub usb: bool,
    pub read_only: bool,
    /// The guest sees a device that supports discard (an SSD); `false` is a disk without it
    /// (virtio only).
    pub discard: bool,
    /// Place in the firmware's boot order (0 first); `None`: not a boot device.
    pub bootindex: Option<u32>,
}

/// How a VM is networked.
#[derive(Debug, Clone)]
pub enum Net {
    /// No network device at all.
    None,
    /// One user-mode NIC with no route out (`restrict=on`).
    Isolated,
    /// A tap on a test LAN (see `lan::Lan`), with a fixed MAC.
    Tap { ns: String, tap: String, mac: String },
}

impl VmConfig {
    pub fn new(name: &str, image: &Path) -> Self {
        VmConfig {
            name: name.to_string(),
            memory_mib: 1536,
            // One vCPU: scenarios run up to four VMs on a 2-core host, and a TCG vCPU costs a
            // host thread. (An earlier note here blamed two vCPUs for containerd "never
            // starting"; it had started: systemd stops printing status once the serial getty
            // holds the console. Boot health now comes from the agent, see `wait_booted`.)
            cpus: 1,
            disks: vec![image.to_path_buf()],
            grow_first_disk: None,
            net: Net::Isolated,
            os_serial: None,
            extra_disks: Vec::new(),
            net_boot: None,
            firmware_pxe: false,
            clock_offset_secs: 0,
            uplink: None,
        }
    }
}

/// A running VM. Killed, and its disk overlays removed, when dropped; the console log stays.
pub struct Vm {
    child: Child,
    lines: Receiver<String>,
    recent: VecDeque<String>,
    seen: Vec<String>,
    pub log: PathBuf,
    scratch: Vec<PathBuf>,
    name: String,
    powered_on: Instant,
}

impl Vm {
    /// Boots a fresh VM: new firmware variables, new disk overlays.
    pub fn start(cfg: &VmConfig, dir: &Path) -> Result<Self> {
        Self::boot(cfg, dir, true)
    }

    /// Boots again after a power cut, on the same disks and firmware variables.
    pub fn restart(cfg: &VmConfig, dir: &Path) -> Result<Self> {
        Self::boot(cfg, dir, false)
    }

    fn boot(cfg: &VmConfig, dir: &Path, fresh: bool) -> Result<Self> {
        let mut scratch = Vec::new();
        let vars = dir.join(format!("{}-vars.fd", cfg.name));
        if fresh {
            fs::copy(OVMF_VARS, &vars).with_context(|| format!("copying {OVMF_VARS} (apt-get install ovmf)"))?;
        }
        scratch.push(vars.clone());
        let mut cmd = match &cfg.net {
            Net::Tap { ns, .. } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            _ => Command::new("qemu-system-x86_64"),
        };
        // A VM given several vCPUs (a control plane) gets a host thread for each, and every
        // CPU feature TCG emulates: Go's TLS and hashing use AES-NI, PCLMULQDQ, BMI2 and AVX2
        // when the CPU has them, and their generic code is far slower still under emulation.
        // `LABFORGE_QEMU_CPU` overrides the model (e.g. `max,avx=off,avx2=off`).
        let model = std::env::var("LABFORGE_QEMU_CPU").ok();
        let (accel, cpu) = match accel() {
            "tcg,thread=single" if cfg.cpus > 1 => ("tcg,thread=multi", Some(model.as_deref().unwrap_or("max"))),
            a => (a, model.as_deref()),
        };
        cmd.args(["-accel", accel, "-M", "q35", "-nodefaults", "-display", "none", "-no-reboot"])
            .args(cpu.map(|c| ["-cpu", c]).into_iter().flatten())
            .args(["-m", &cfg.memory_mib.to_string(), "-smp", &cfg.cpus.to_string()])
            .args(["-serial", "stdio"])
            .args(["-rtc", &rtc(cfg.clock_offset_secs)])
            // Real PCs have a hardware RNG (RDRAND, TPM); without one a TCG guest can wait
            // minutes for the kernel's entropy pool, and everything calling getrandom() with it.
            .args(["-device", "virtio-rng-pci"])
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()));
        for (i, base) in cfg.disks.iter().enumerate() {
            let overlay = dir.join(format!("{}-disk{i}.qcow2", cfg.name));
            let base = fs::canonicalize(base).with_context(|| format!("image {}", base.display()))?;
            let fmt = if base.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
            if fresh {
                let mut img = Command::new("qemu-img");
                img.args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"]).arg(&base).arg(&overlay);
                if i == 0 {
                    if let Some(extra) = cfg.grow_first_disk {
                        let size = fs::metadata(&base)?.len() + extra;
                        img.arg(size.to_string());
                    }
                }
                run(&mut img)?;
            }
            scratch.push(overlay.clone());
            cmd.arg("-drive").arg(format!("if=none,id=disk{i},format=qcow2,file={}", overlay.display()));
            let mut dev = format!("virtio-blk-pci,drive=disk{i}");
            if i == 0 {
                dev.push_str(",bootindex=0");
                if let Some(serial) = &cfg.os_serial {
                    dev.push_str(&format!(",serial={serial}"));
                }
            }
            cmd.arg("-device").arg(dev);
        }
        if cfg.extra_disks.iter().any(|d| d.usb) {
            cmd.args(["-device", "qemu-xhci,id=xhci"]);
        }
        for (i, d) in cfg.extra_disks.iter().enumerate() {
            let ro = if d.read_only { ",readonly=on" } else { "" };
            cmd.arg("-drive")
                .arg(format!("if=none,id=extra{i},format=raw,discard=unmap,file={}{ro}", d.path.display()));
            let dev = match (d.usb, d.discard) {
                (true, _) => "usb-storage,bus=xhci.0",
                (false, true) => "virtio-blk-pci",
                (false, false) => "virtio-blk-pci,discard=off",
            };
            let boot = d.bootindex.map(|b| format!(",bootindex={b}")).unwrap_or_default();
            cmd.arg("-device").arg(format!("{dev},drive=extra{i},serial={}{boot}", d.serial));
        }
        match &cfg.net {
            Net::None => {}
            Net::Isolated => {
                cmd.args(["-nic", "user,restrict=on,model=virtio-net-pci"]);
            }
            Net::Tap { tap, mac, .. } => {
                cmd.arg("-netdev").arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no")).arg("-device").arg(
                    format!(
                        "virtio-net-pci,netdev=n0,mac={mac}{}{}",
                        cfg.net_boot.map(|b| format!(",bootindex={b}")).unwrap_or_default(),
                        if cfg.firmware_pxe { ",romfile=" } else { "" }
                    ),
                );
            }
        }
        if let (Net::Tap { .. }, Some((tap, mac))) = (&cfg.net, &cfg.uplink) {
            cmd.arg("-netdev")
                .arg(format!("tap,id=n1,ifname={tap},script=no,downscript=no"))
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=n1,mac={mac},romfile="));
        }
        // A fresh boot's log, then `-restart`, `-restart2`, … : every boot's console is kept.
        let mut log = dir.join(format!("{}-console.log", cfg.name));
        if !fresh {
            log = (1..)
                .map(|n: u32| {
                    dir.join(format!(
                        "{}-console-restart{}.log",
                        cfg.name,
                        if n == 1 { String::new() } else { n.to_string() }
                    ))
                })
                .find(|p| !p.exists())
                .expect("a free name");
        }
        let logfile = fs::File::create(&log)?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        let (tx, rx) = mpsc::channel();
        forward_lines(child.stdout.take().expect("piped"), tx.clone(), "", Some(logfile));
        forward_lines(child.stderr.take().expect("piped"), tx, "qemu: ", None);
        Ok(Vm {
            child,
            lines: rx,
            recent: VecDeque::new(),
            seen: Vec::new(),
            log,
            scratch,
            name: cfg.name.clone(),
            powered_on: Instant::now(),
        })
    }

    /// Waits until the console has shown a line containing `needle` (lines already seen count)
    /// and returns it.
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> Result<String> {
        self.wait_for_match(|l| l.contains(needle), needle, within)
    }

    /// Like `wait_for`, with a predicate.
    pub fn wait_for_match(&mut self, pred: impl Fn(&str) -> bool, what: &str, within: Duration) -> Result<String> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + within;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.keep(line.clone());
                    if pred(&line) {
                        // Where a scenario's time goes, in its output (CI keeps it on failure).
                        let after = self.powered_on.elapsed().as_secs();
                        eprintln!("qemu-tests: {}: {what} ({after} s after power-on)", self.name);
                        return Ok(line);
                    }
                    // A panicked guest prints nothing more: say so now, not at the deadline.
                    if line.contains("Kernel panic - not syncing") {
                        bail!(
                            "the guest kernel panicked while waiting for {what:?}; last lines:\n{}\n(full log: {})",
                            self.tail(),
                            self.log.display()
                        );
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "no console line with {what:?} within {within:?}; last lines:\n{}\n(full log: {})",
                    self.tail(),
                    self.log.display()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "VM stopped before printing {what:?}; last lines:\n{}\n(full log: {})",
                    self.tail(),
                    self.log.display()
                ),
            }
        }
    }

    /// Remembers a console line (all of them, and the last 40 for error messages).
    fn keep(&mut self, line: String) {
        self.recent.push_back(line.clone());
        if self.recent.len() > 40 {
            self.recent.pop_front();
        }
        self.seen.push(line);
    }

    fn tail(&self) -> String {
        self.recent.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits for an agent `labforge-status` line that satisfies `pred` (lines already seen
    /// count) and returns the status it carries.
    pub fn wait_status(&mut self, what: &str, within: Duration, pred: impl Fn(&Status) -> bool) -> Result<Status> {
        let line = self.wait_for_match(|l| parse_status(l).is_some_and(|s| pred(&s)), what, within)?;
        Ok(parse_status(&line).expect("matched"))
    }

    /// Waits until the agent reports that systemd finished booting the node, and fails if any
    /// unit failed. (systemd's own "Reached target" lines stop once the serial getty holds the
    /// console, so the console cannot tell.)
    pub fn wait_booted(&mut self, within: Duration) -> Result<Status> {
        let s = self.wait_status("systemd finished booting", within, |s| s.system.booted())?;
        if !s.system.failed_units.is_empty() {
            bail!(
                "units failed on {}: {:?} (full log: {})",
                s.node.hostname,
                s.system.failed_units,
                self.log.display()
            );
        }
        Ok(s)
    }

    /// Every console line seen so far.
    pub fn console(&self) -> &[String] {
        &self.seen
    }

    /// Fails if the console shows a kernel oops/panic or a failed systemd unit (checked after
    /// every scenario, as a user reading the console would). Units that fail after the serial
    /// getty started show only in the agent's status: see `wait_booted`.
    pub fn check_console_health(&self) -> Result<()> {
        const BAD: &[&str] = &["Kernel panic", "Oops:", "BUG:", "Call Trace:", "[FAILED]", "segfault at"];
        let bad: Vec<&String> = self.seen.iter().filter(|l| BAD.iter().any(|b| l.contains(b))).collect();
        if !bad.is_empty() {
            bail!(
                "console shows problems:\n{}\n(full log: {})",
                bad.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
                self.log.display()
            );
        }
        Ok(())
    }

    /// Waits until the VM stops by itself (it powered off or rebooted: QEMU runs with
    /// `-no-reboot`), reading the console to the end, then checks the console's health. The
    /// disks and firmware variables stay for `restart`.
    pub fn wait_stopped(mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.keep(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => bail!(
                    "the VM did not stop within {within:?}; last lines:\n{}\n(full log: {})",
                    self.tail(),
                    self.log.display()
                ),
            }
        }
        self.child.wait()?;
        self.scratch.clear();
        self.check_console_health()
    }

    /// Cuts the power: kills QEMU without any shutdown. The disks stay for `restart`.
    pub fn power_cut(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.scratch.clear();
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in &self.scratch {
            let _ = fs::remove_file(f);
        }
    }
}

/// The status carried by an agent console line, if `line` is one.
pub fn parse_status(line: &str) -> Option<Status> {
    let at = line.find(CONSOLE_PREFIX)?;
    serde_json::from_str(&line[at + CONSOLE_PREFIX.len()..]).ok()
}

/// Sends each line of `stream` (prefixed) to `tx`, and to `log` when given, until either end
/// closes. Serial output is not always UTF-8; it is passed on lossily.
fn forward_lines(
    stream: impl std::io::Read + Send + 'static,
    tx: mpsc::Sender<String>,
    prefix: &'static str,
    mut log: Option<fs::File>,
) {
    std::thread::spawn(move || {
        // systemd redraws "A start job is running..." with bare carriage returns: treat them as
        // line ends too, or a hang would show nothing at all in the log.
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let Ok(n) = read_until_any(&mut reader, &mut raw) else { break };
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&raw);
            let text = text.trim_end_matches(['\r', '\n']);
            if text.is_empty() {
                continue;
            }
            let line = format!("{prefix}{text}");
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// Reads up to and including the next `\n` or `\r`.
fn read_until_any(r: &mut impl BufRead, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let (done, used) = {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Ok(total);
            }
            match buf.iter().position(|b| *b == b'\n' || *b == b'\r') {
                Some(i) => {
                    out.extend_from_slice(&buf[..=i]);
                    (true, i + 1)
                }
                None => {
                    out.extend_from_slice(buf);
                    (false, buf.len())
                }
            }
        };
        r.consume(used);
        total += used;
        if done {
            return Ok(total);
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// QEMU's `-rtc` for a clock `offset` seconds from the host's (`base=utc` for none).
fn rtc(offset: i64) -> String {
    if offset == 0 {
        return "base=utc".into();
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() as i64;
    format!("base={}", civil(now + offset))
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for unix time `t`: days to a civil date in the proleptic
/// Gregorian calendar (the well-known days-from-civil inverse).
fn civil(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod rtc_tests {
    #[test]
    fn rtc_base_is_a_civil_date() {
        assert_eq!(super::rtc(0), "base=utc");
        assert_eq!(super::civil(0), "1970-01-01T00:00:00");
        assert_eq!(super::civil(86_400_000), "1972-09-27T00:00:00");
        assert_eq!(super::civil(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(super::civil(951_782_400), "2000-02-29T00:00:00");
    }
}
