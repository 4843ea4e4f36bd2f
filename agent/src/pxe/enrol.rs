//! Enrolment: how a netbooted node, whose squashfs carries no secret, gets the cluster secret.
//!
//! - The master has an enrolment key pair (X25519) derived from the cluster secret. Its public
//!   half goes into the iPXE script the master serves (`labforge.enrol=` on the kernel command
//!   line), so the node knows which master answered its netboot.
//! - The node makes a key pair for this boot (kept 0600 in `/run`, so an agent restart keeps its
//!   place in the queue) and asks `POST /pxe/enrol` with its MAC, machine id, hostname and
//!   public key. The master decides by its `[pxe] enrol` policy ([`decide`]): admitted,
//!   pending (waits for the window or an admin) or denied.
//! - An admitted node gets the secret sealed to its key: ChaCha20-Poly1305 under a key from
//!   X25519(master, node), bound to both public keys and the node's MAC. Only that node can
//!   open it; the node checks the secret it opened derives the master key it pinned.
//! - Admins act through `POST /pxe/enrol/admin` (`labforge-agent enrol`), authenticated with the
//!   cluster secret (HMAC, timestamp, nonce): open the window for a while, approve a node by its
//!   MAC or key fingerprint. Approvals are kept on the state volume (by MAC), so an approved
//!   diskless node is admitted again after a power cut.
//!
//! What this does not do: netboot's first files are unauthenticated (PXE, TFTP and HTTP), so
//! whoever answers a PC's PXE request first can boot it into anything; enrolment cannot help
//! that PC. What it guarantees is that a machine on the LAN learns the secret only when the
//! policy admits it, that an answer meant for one node is useless to every other, and that a
//! node takes the secret only from the master that served its boot script.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use x25519_dalek::{PublicKey, StaticSecret};

use super::{EnrolPolicy, PxeConfig};
use crate::cluster::discovery::beacon::{is_hostname, MAX_SKEW_MS};
use crate::report::Report;
use crate::secret::Secret;
use labforge_core::config::pxe::{is_machine_id, normalise_mac};

/// The key pair a master answers enrolments with, derived from the cluster secret.
fn master_key(secret: &Secret) -> StaticSecret {
    let hk = hkdf::Hkdf::<Sha256>::new(None, secret.bytes());
    let mut k = [0u8; 32];
    hk.expand(b"labforge-enrol-v1 master key", &mut k).expect("32 bytes is a valid length");
    StaticSecret::from(k)
}

/// The master's enrolment public key, as it goes on a netbooted node's kernel command line.
pub fn master_public_hex(secret: &Secret) -> String {
    hex::encode(PublicKey::from(&master_key(secret)).as_bytes())
}

/// A short, readable fingerprint of a node's public key (what an admin compares with the
/// node's console before approving it).
pub fn fingerprint(key: &[u8; 32]) -> String {
    let d = Sha256::digest(key);
    let h = hex::encode(&d[..8]);
    format!("{}-{}-{}-{}", &h[0..4], &h[4..8], &h[8..12], &h[12..16])
}

/// Whether `text` has the shape [`fingerprint`] gives: four groups of four hex digits.
fn is_fingerprint(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 4 && groups.iter().all(|g| g.len() == 4 && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn parse_key(text: &str) -> Option<[u8; 32]> {
    let b = hex::decode(text).ok()?;
    b.try_into().ok()
}

/// A netbooted node asks to be admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub mac: String,
    pub machine_id: String,
    pub hostname: String,
    /// The node's X25519 public key for this boot (hex).
    pub key: String,
}

impl Request {
    /// The request's fields are what they claim to be; returns the node's key.
    pub fn validate(&self) -> Result<[u8; 32]> {
        if normalise_mac(&self.mac).as_deref() != Some(self.mac.as_str()) {
            bail!("mac is not a lowercase MAC address");
        }
        if !is_machine_id(&self.machine_id) {
            bail!("machine_id is not 32 hex digits");
        }
        if !is_hostname(&self.hostname) {
            bail!("hostname is not an RFC 1123 host name");
        }
        parse_key(&self.key).context("key is not 32 bytes of hex")
    }
}

/// The master's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Answer {
    Admitted {
        /// The master's enrolment public key (hex).
        master: String,
        nonce: String,
        /// The cluster secret, sealed to the node's key.
        sealed: String,
    },
    Pending {
        fingerprint: String,
        message: String,
    },
    Denied {
        message: String,
    },
}

fn seal_cipher(shared: &[u8; 32], node: &[u8; 32], master: &[u8; 32]) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(node);
    salt[32..].copy_from_slice(master);
    let hk = hkdf::Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut k = [0u8; 32];
    hk.expand(b"labforge-enrol-v1 seal", &mut k).expect("32 bytes is a valid length");
    ChaCha20Poly1305::new(Key::from_slice(&k))
}

/// The master's side: the secret sealed to `node` (bound to its MAC).
pub fn seal(secret: &Secret, node: &[u8; 32], mac: &str) -> Result<Answer> {
    let ours = master_key(secret);
    let master = *PublicKey::from(&ours).as_bytes();
    let shared = ours.diffie_hellman(&PublicKey::from(*node));
    if !shared.was_contributory() {
        bail!("the node's key is a low-order point");
    }
    let mut nonce = [0u8; 12];
    getrandom::getrandom(&mut nonce).map_err(|e| anyhow!("random bytes: {e}"))?;
    let sealed = seal_cipher(shared.as_bytes(), node, &master)
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: secret.bytes(), aad: mac.as_bytes() })
        .map_err(|_| anyhow!("sealing the secret"))?;
    Ok(Answer::Admitted { master: hex::encode(master), nonce: hex::encode(nonce), sealed: hex::encode(sealed) })
}

/// The node's side: opens an admission with its key; `pinned` is the master key from the
/// kernel command line. The secret must derive the master key that sealed it.
pub fn open(ours: &StaticSecret, pinned: Option<&[u8; 32]>, mac: &str, answer: &Answer) -> Result<Secret> {
    let Answer::Admitted { master, nonce, sealed } = answer else { bail!("not an admission") };
    let master = parse_key(master).context("malformed master key")?;
    if let Some(p) = pinned {
        if p != &master {
            bail!("the answer comes from another master than the one that served this node's boot script");
        }
    }
    let nonce = hex::decode(nonce).ok().filter(|n| n.len() == 12).context("malformed nonce")?;
    let sealed = hex::decode(sealed).context("malformed sealed secret")?;
    let node = *PublicKey::from(ours).as_bytes();
    let shared = ours.diffie_hellman(&PublicKey::from(master));
    if !shared.was_contributory() {
        bail!("the master's key is a low-order point");
    }
    let plain = seal_cipher(shared.as_bytes(), &node, &master)
        .decrypt(Nonce::from_slice(&nonce), Payload { msg: &sealed, aad: mac.as_bytes() })
        .map_err(|_| anyhow!("the sealed secret does not open with this node's key"))?;
    let bytes: [u8; 32] = plain.try_into().map_err(|_| anyhow!("the sealed secret is not 32 bytes"))?;
    let secret = Secret::from_bytes(bytes);
    if PublicKey::from(&master_key(&secret)).as_bytes() != &master {
        bail!("the secret does not belong to the master that sent it");
    }
    Ok(secret)
}

/// What the policy says about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admit,
    Pending(String),
    Deny(String),
}

/// The policy: `approved` holds MACs and key fingerprints an admin approved; the window is
/// open until `window_until` (unix seconds).
pub fn decide(
    cfg: &PxeConfig,
    now: u64,
    window_until: u64,
    approved: &BTreeSet<String>,
    mac: &str,
    machine_id: &str,
    fp: &str,
) -> Decision {
    let is_approved = approved.contains(mac) || approved.contains(fp);
    match cfg.enrol {
        EnrolPolicy::Allowlist if cfg.allows(mac, machine_id) => Decision::Admit,
        EnrolPolicy::Allowlist => Decision::Deny(format!(
            "{mac} is not on this cluster's enrolment allowlist ([pxe] enrol-allow in the image spec)"
        )),
        EnrolPolicy::Window if now < window_until || is_approved => Decision::Admit,
        EnrolPolicy::Window => Decision::Pending(
            "the enrolment window is closed: an admin opens it with `labforge-agent enrol --for 15m` or approves \
             this node with `labforge-agent enrol --approve ID` on the master"
                .into(),
        ),
        EnrolPolicy::Approve if is_approved => Decision::Admit,
        EnrolPolicy::Approve => {
            Decision::Pending("waiting for an admin: `labforge-agent enrol --approve ID` on the master".into())
        }
    }
}

crate::wire_enum! {
    /// Where one enrolling node stands.
    #[derive(Default)]
    pub enum EnrolState {
        #[default]
        Pending = "pending",
        Admitted = "admitted",
        Denied = "denied",
    }
}

/// One node that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolEntry {
    pub mac: String,
    pub machine_id: String,
    pub hostname: String,
    pub fingerprint: String,
    pub address: String,
    pub state: EnrolState,
    /// Unix seconds of its last request.
    pub last_seen: u64,
}

/// The enrolment part of the master's `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolStatus {
    pub policy: String,
    /// Unix seconds until which the window is open (0: closed or not the policy).
    pub window_until: u64,
    pub admitted: u64,
    /// Requests refused (denied, malformed, unauthenticated admin requests).
    pub refused: u64,
    /// The nodes that asked recently, newest last (at most [`MAX_ENTRIES`]).
    pub nodes: Vec<EnrolEntry>,
}

/// Nodes remembered in the status (the oldest is forgotten first, pending ones last).
pub const MAX_ENTRIES: usize = 64;
/// Keys remembered from one address.
pub const MAX_PER_ADDRESS: usize = 4;
/// Admin nonces remembered against replays.
const MAX_ADMIN_NONCES: usize = 256;

/// The master's enrolment desk, shared by the HTTP endpoints and the netboot task.
pub struct Desk {
    cfg: PxeConfig,
    report: Report,
    /// Where approvals are kept (`<state>/enrol-approved.json`).
    approvals_file: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    window_until: u64,
    window_opened: bool,
    approved: BTreeSet<String>,
    nodes: BTreeMap<String, EnrolEntry>,
    admitted: u64,
    refused: u64,
    admin_nonces: HashMap<String, u64>,
}

/// What an admin asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum AdminAction {
    /// Open the window for this many seconds from now.
    Open { seconds: u64 },
    /// Approve a node by MAC or key fingerprint.
    Approve { id: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminRequest {
    #[serde(flatten)]
    pub action: AdminAction,
    pub ts_ms: u64,
    pub nonce: String,
    pub mac: String,
}

fn admin_mac(secret: &Secret, action: &AdminAction, ts_ms: u64, nonce: &str) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.bytes()).expect("any key length");
    m.update(b"labforge-enrol-admin-v1");
    m.update(serde_json::to_string(action).expect("serialises").as_bytes());
    m.update(format!("\0{ts_ms}\0{nonce}").as_bytes());
    m
}

impl AdminRequest {
    pub fn new(secret: &Secret, action: AdminAction, ts_ms: u64) -> Self {
        let mut n = [0u8; 16];
        getrandom::getrandom(&mut n).expect("random bytes");
        let nonce = hex::encode(n);
        let mac = hex::encode(admin_mac(secret, &action, ts_ms, &nonce).finalize().into_bytes());
        AdminRequest { action, ts_ms, nonce, mac }
    }
}

impl Desk {
    pub fn new(cfg: PxeConfig, report: Report, state_dir: &Path) -> Self {
        let approvals_file = state_dir.join("enrol-approved.json");
        let approved = std::fs::read(&approvals_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<BTreeSet<String>>(&b).ok())
            .unwrap_or_default();
        let desk = Desk { cfg, report, approvals_file, inner: Mutex::new(Inner { approved, ..Default::default() }) };
        desk.publish(&desk.lock());
        desk
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node leads cluster `uid` and serves netboot: the window opens once per cluster,
    /// when it first forms. The opening is kept on the state volume, so a restart of the agent
    /// or of the master (or a watchdog kill) never opens it again; an admin does, with
    /// `labforge-agent enrol --for`.
    pub fn leading(&self, uid: &str, now: u64) {
        let mut i = self.lock();
        if i.window_opened || self.cfg.enrol != EnrolPolicy::Window {
            return;
        }
        i.window_opened = true;
        #[derive(Serialize, Deserialize)]
        struct Opened {
            uid: String,
            until: u64,
        }
        let file = self.approvals_file.with_file_name("enrol-window.json");
        let saved = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice::<Opened>(&b).ok());
        match saved {
            Some(o) if o.uid == uid => {
                i.window_until = i.window_until.max(o.until);
                info!("the enrolment window of cluster {uid} was opened before; not opening it again");
            }
            _ => {
                let d = labforge_core::config::pxe::parse_window(&self.cfg.enrol_window)
                    .unwrap_or(Duration::from_secs(1800));
                i.window_until = now + d.as_secs();
                let opened = Opened { uid: uid.to_string(), until: i.window_until };
                let bytes = serde_json::to_vec(&opened).expect("json");
                if let Err(e) = crate::sys::fs::write_durable_mode(&file, &bytes, 0o600) {
                    warn!("recording the enrolment window: {e:#}");
                }
                info!(until = i.window_until, "enrolment window open for {}", humantime_secs(d.as_secs()));
            }
        }
        self.publish(&i);
    }

    /// A netbooted node asks; `peer` is the address it asked from.
    pub fn request(&self, secret: &Secret, req: &Request, peer: IpAddr, now: u64) -> Answer {
        let key = match req.validate() {
            Ok(k) => k,
            Err(e) => {
                let mut i = self.lock();
                i.refused += 1;
                self.publish(&i);
                return Answer::Denied { message: format!("malformed enrolment request: {e}") };
            }
        };
        let fp = fingerprint(&key);
        let mut i = self.lock();
        // One address cannot crowd the list (and push real pending nodes out of it).
        let from_peer = i.nodes.values().filter(|e| e.address == peer.to_string() && e.fingerprint != fp).count();
        if from_peer >= MAX_PER_ADDRESS {
            i.refused += 1;
            self.publish(&i);
            return Answer::Denied { message: format!("too many enrolment keys from {peer}; try again later") };
        }
        let decision = decide(&self.cfg, now, i.window_until, &i.approved, &req.mac, &req.machine_id, &fp);
        let (state, answer) = match decision {
            Decision::Admit => match seal(secret, &key, &req.mac) {
                Ok(a) => {
                    i.admitted += 1;
                    info!(mac = %req.mac, hostname = %req.hostname, fingerprint = %fp, %peer, "admitted a netbooted node");
                    (EnrolState::Admitted, a)
                }
                Err(e) => {
                    i.refused += 1;
                    (EnrolState::Denied, Answer::Denied { message: format!("{e:#}") })
                }
            },
            Decision::Pending(message) => (EnrolState::Pending, Answer::Pending { fingerprint: fp.clone(), message }),
            Decision::Deny(message) => {
                i.refused += 1;
                (EnrolState::Denied, Answer::Denied { message })
            }
        };
        let entry = EnrolEntry {
            mac: req.mac.clone(),
            machine_id: req.machine_id.clone(),
            hostname: req.hostname.clone(),
            fingerprint: fp.clone(),
            address: peer.to_string(),
            state,
            last_seen: now,
        };
        let changed = i.nodes.get(&fp).map(|e| e.state) != Some(state);
        if changed && state != EnrolState::Admitted {
            warn!(mac = %req.mac, hostname = %req.hostname, fingerprint = %fp, %peer, "enrolment {state}");
        }
        i.nodes.insert(fp, entry);
        while i.nodes.len() > MAX_ENTRIES {
            // Pending nodes wait for an admin: the oldest of the others go first.
            let oldest = i
                .nodes
                .iter()
                .min_by_key(|(_, e)| (e.state == EnrolState::Pending, e.last_seen))
                .map(|(k, _)| k.clone())
                .expect("not empty");
            i.nodes.remove(&oldest);
        }
        self.publish(&i);
        answer
    }

    /// An admin's request, authenticated with the cluster secret.
    pub fn admin(&self, secret: &Secret, req: &AdminRequest, now_ms: u64) -> Result<String> {
        let checked = (|| {
            let tag = hex::decode(&req.mac).map_err(|_| anyhow!("malformed MAC"))?;
            admin_mac(secret, &req.action, req.ts_ms, &req.nonce)
                .verify_slice(&tag)
                .map_err(|_| anyhow!("not signed with this cluster's secret"))?;
            if req.ts_ms.abs_diff(now_ms) > MAX_SKEW_MS {
                bail!("stale request (clock difference over {} s)", MAX_SKEW_MS / 1000);
            }
            Ok(())
        })();
        let mut i = self.lock();
        if let Err(e) = checked {
            i.refused += 1;
            self.publish(&i);
            return Err(e);
        }
        i.admin_nonces.retain(|_, ts| ts.abs_diff(now_ms) <= MAX_SKEW_MS);
        if i.admin_nonces.len() >= MAX_ADMIN_NONCES {
            bail!("too many admin requests; try again in a minute");
        }
        if i.admin_nonces.insert(req.nonce.clone(), req.ts_ms).is_some() {
            bail!("replayed request");
        }
        let now = now_ms / 1000;
        let said = match &req.action {
            AdminAction::Open { seconds } => {
                if *seconds > labforge_core::config::pxe::MAX_WINDOW.as_secs() {
                    bail!("the longest enrolment window is 24h");
                }
                if self.cfg.enrol != EnrolPolicy::Window {
                    bail!(
                        "this cluster admits by {} (enrol = \"{}\"): a window would not apply",
                        if self.cfg.enrol == EnrolPolicy::Allowlist { "its allowlist" } else { "approval" },
                        self.cfg.enrol.as_str()
                    );
                }
                i.window_until = now + seconds;
                format!("enrolment window open for {}", humantime_secs(*seconds))
            }
            AdminAction::Approve { id } => {
                if self.cfg.enrol == EnrolPolicy::Allowlist {
                    bail!(
                        "this cluster admits only its allowlist (enrol = \"allowlist\"): add the node to enrol-allow"
                    );
                }
                let id = id.trim().to_ascii_lowercase();
                // A key fingerprint admits that one key (this boot of that node); a MAC admits
                // any node claiming it, from now on (kept across reboots, for diskless nodes).
                let said = if let Some(mac) = normalise_mac(&id) {
                    i.approved.insert(mac.clone());
                    format!("approved MAC {mac}: any node that claims it is admitted from now on (MACs can be forged on a LAN; approve a key fingerprint to admit one node once)")
                } else if is_fingerprint(&id) {
                    // Read off the node's console, it may be approved before the node asks.
                    let seen = i.nodes.values().any(|e| e.fingerprint == id);
                    i.approved.insert(id.clone());
                    if seen {
                        format!("approved key {id}")
                    } else {
                        format!("approved key {id} (not seen yet: that node is admitted when it asks)")
                    }
                } else {
                    bail!("{id} is neither a MAC address nor a key fingerprint (xxxx-xxxx-xxxx-xxxx, see `labforge-agent enrol`)");
                };
                let bytes = serde_json::to_vec_pretty(&i.approved)?;
                crate::sys::fs::write_durable_mode(&self.approvals_file, &bytes, 0o600)
                    .with_context(|| format!("saving {}", self.approvals_file.display()))?;
                said
            }
        };
        info!("enrolment: {said}");
        self.publish(&i);
        Ok(said)
    }

    fn publish(&self, i: &Inner) {
        let mut nodes: Vec<EnrolEntry> = i.nodes.values().cloned().collect();
        nodes.sort_by_key(|e| e.last_seen);
        let status = EnrolStatus {
            policy: self.cfg.enrol.as_str().into(),
            window_until: i.window_until,
            admitted: i.admitted,
            refused: i.refused,
            nodes,
        };
        self.report.update(|s| s.enrol = Some(status));
    }
}

/// The enrolment status as `labforge-agent enrol` prints it.
pub fn render(e: &EnrolStatus, now: u64) -> String {
    use std::fmt::Write;
    let mut out = format!("policy: {}", e.policy);
    if e.window_until > now {
        let _ = write!(out, ", window open for {}", humantime_secs(e.window_until - now));
    } else if e.policy == EnrolPolicy::Window.as_str() {
        out.push_str(", window closed");
    }
    let _ = writeln!(out, "; {} admitted, {} refused", e.admitted, e.refused);
    for n in &e.nodes {
        let _ = writeln!(
            out,
            "{:<9} {}  {}  {:<20} {:<15} {}",
            n.state.to_string(),
            n.mac,
            n.fingerprint,
            n.hostname,
            n.address,
            n.machine_id
        );
    }
    out
}

fn humantime_secs(s: u64) -> String {
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

/// The master key a netbooted node pinned: `labforge.enrol=<hex>` on its kernel command line
/// (its iPXE script puts it there).
pub fn pinned_master(cmdline: &str) -> Option<[u8; 32]> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix("labforge.enrol=")).and_then(parse_key)
}

/// Where a netbooted node keeps its key for this boot (memory only).
pub const NODE_KEY: &str = "/run/labforge/enrol.key";

/// This boot's key: made once, kept 0600 so an agent restart keeps the node's fingerprint.
pub fn node_key(path: &Path) -> Result<StaticSecret> {
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Some(k) = parse_key(text.trim()) {
            return Ok(StaticSecret::from(k));
        }
    }
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k).map_err(|e| anyhow!("random bytes: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::sys::fs::write_durable_mode(path, format!("{}\n", hex::encode(k)).as_bytes(), 0o600)?;
    Ok(StaticSecret::from(k))
}

/// How often a pending or refused node asks again.
pub const POLL: Duration = Duration::from_secs(5);

/// The node's side: asks the master at `base` (`http://master:9743/pxe`) until admitted,
/// reporting where it stands, with the key kept at `key_path`; then writes the secret to
/// `secret_path` (0600) and returns it.
pub async fn obtain(
    report: Report,
    base: String,
    cmdline: String,
    who: Request,
    secret_path: PathBuf,
    key_path: PathBuf,
) -> Secret {
    use crate::status::Phase;
    let pinned = pinned_master(&cmdline);
    if pinned.is_none() {
        warn!("the boot script named no master key (labforge.enrol=): trusting the first master that admits this node");
    }
    let url = format!("{base}/enrol");
    let mut last = String::new();
    loop {
        let path = key_path.clone();
        let key = match crate::sys::blocking(move || node_key(&path)).await {
            Ok(k) => k,
            Err(e) => {
                say(&report, &mut last, Phase::NeedsSecret, format!("enrolment: {e:#}"));
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        let req = Request { key: hex::encode(PublicKey::from(&key).as_bytes()), ..who.clone() };
        let fp = fingerprint(&parse_key(&req.key).expect("hex of 32 bytes"));
        let asked = {
            let (url, req) = (url.clone(), req.clone());
            crate::sys::blocking(move || {
                crate::sys::http::Client::with_timeout(Duration::from_secs(10)).post_json::<_, Answer>(&url, &req)
            })
            .await
        };
        match asked {
            Ok(answer @ Answer::Admitted { .. }) => match open(&key, pinned.as_ref(), &who.mac, &answer) {
                Ok(secret) => {
                    let text = format!("{}\n", secret.to_hex());
                    let path = secret_path.clone();
                    let saved = crate::sys::blocking(move || {
                        if let Some(d) = path.parent() {
                            std::fs::create_dir_all(d)?;
                        }
                        crate::sys::fs::write_durable_mode(&path, text.as_bytes(), 0o600)
                    })
                    .await;
                    if let Err(e) = saved {
                        warn!("keeping the cluster secret in {}: {e:#}", secret_path.display());
                    }
                    info!(fingerprint = %fp, "enrolled: the master admitted this node");
                    return secret;
                }
                Err(e) => say(&report, &mut last, Phase::NeedsSecret, format!("enrolment answer refused: {e:#}")),
            },
            Ok(Answer::Pending { message, .. }) => say(
                &report,
                &mut last,
                Phase::Enrolling,
                format!("waiting to be admitted by the master (MAC {}, key fingerprint {fp}): {message}", who.mac),
            ),
            Ok(Answer::Denied { message }) => {
                say(&report, &mut last, Phase::NeedsSecret, format!("the master refused to enrol this node: {message}"))
            }
            Err(e) => say(&report, &mut last, Phase::Enrolling, format!("asking {url} to enrol: {e:#}")),
        }
        tokio::time::sleep(POLL).await;
    }
}

fn say(report: &Report, last: &mut String, phase: crate::status::Phase, message: String) {
    if *last != message {
        warn!("{message}");
        last.clone_from(&message);
    }
    report.update(|s| {
        s.phase = phase;
        s.message = message;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::from_bytes([7; 32])
    }

    fn node() -> (StaticSecret, [u8; 32]) {
        let k = StaticSecret::from([9; 32]);
        let p = *PublicKey::from(&k).as_bytes();
        (k, p)
    }

    #[test]
    fn only_the_node_that_asked_opens_its_admission_and_only_from_the_pinned_master() {
        let (k, p) = node();
        let mac = "52:54:00:00:00:02";
        let a = seal(&secret(), &p, mac).unwrap();
        let pinned = parse_key(&master_public_hex(&secret())).unwrap();
        assert_eq!(open(&k, Some(&pinned), mac, &a).unwrap().bytes(), secret().bytes());
        assert!(open(&k, None, mac, &a).is_ok(), "without a pin the first master is trusted");
        // Another node (another key) cannot open it; nor can it be moved to another MAC.
        let other = StaticSecret::from([5; 32]);
        assert!(open(&other, Some(&pinned), mac, &a).is_err());
        assert!(open(&k, Some(&pinned), "52:54:00:00:00:09", &a).is_err());
        // A master with another secret is not the one the boot script named.
        let rogue = seal(&Secret::from_bytes([8; 32]), &p, mac).unwrap();
        let e = open(&k, Some(&pinned), mac, &rogue).unwrap_err();
        assert!(format!("{e}").contains("another master"), "{e}");
        // A low-order point (all zeros) is refused.
        assert!(seal(&secret(), &[0; 32], mac).is_err());
        // The sealed bytes are not the secret in clear.
        let Answer::Admitted { sealed, .. } = &a else { unreachable!() };
        assert!(!sealed.contains(&secret().to_hex()));
    }

    #[test]
    fn policy_table() {
        let cfg = |enrol, allow: &[&str]| PxeConfig {
            enrol,
            enrol_allow: allow.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let mac = "52:54:00:00:00:02";
        let id = "0123456789abcdef0123456789abcdef";
        let none = BTreeSet::new();
        let by_mac: BTreeSet<String> = [mac.to_string()].into();
        let by_fp: BTreeSet<String> = ["aaaa-bbbb-cccc-dddd".to_string()].into();
        let w = cfg(EnrolPolicy::Window, &[]);
        assert_eq!(decide(&w, 100, 200, &none, mac, id, "f"), Decision::Admit);
        assert!(matches!(decide(&w, 200, 200, &none, mac, id, "f"), Decision::Pending(m) if m.contains("--for")));
        assert_eq!(decide(&w, 300, 200, &by_mac, mac, id, "f"), Decision::Admit, "approved after the window");
        let a = cfg(EnrolPolicy::Approve, &[]);
        assert!(matches!(decide(&a, 100, 200, &none, mac, id, "f"), Decision::Pending(_)), "no window");
        assert_eq!(decide(&a, 100, 0, &by_fp, mac, id, "aaaa-bbbb-cccc-dddd"), Decision::Admit);
        let l = cfg(EnrolPolicy::Allowlist, &[id]);
        assert_eq!(decide(&l, 100, 0, &none, mac, id, "f"), Decision::Admit);
        let l = cfg(EnrolPolicy::Allowlist, &["52:54:00:00:00:03"]);
        assert!(
            matches!(decide(&l, 100, u64::MAX, &by_mac, mac, id, "f"), Decision::Deny(m) if m.contains("allowlist"))
        );
    }

    #[test]
    fn requests_are_validated() {
        let good = Request {
            mac: "52:54:00:00:00:02".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            hostname: "lab-01".into(),
            key: hex::encode([1u8; 32]),
        };
        assert!(good.validate().is_ok());
        for bad in [
            Request { mac: "52:54:00:00:00:0G".into(), ..good.clone() },
            Request { mac: "52:54:00:00:00:AB".into(), ..good.clone() },
            Request { machine_id: "x".repeat(32), ..good.clone() },
            Request { hostname: "a\nb".into(), ..good.clone() },
            Request { key: "00".into(), ..good.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert_eq!(fingerprint(&[1; 32]).len(), 19);
        let cmdline = format!("boot=live labforge.enrol={} quiet", hex::encode([3u8; 32]));
        assert_eq!(pinned_master(&cmdline), Some([3; 32]));
        assert_eq!(pinned_master("boot=live labforge.enrol= quiet"), None);
    }

    #[test]
    fn admin_requests_need_the_secret_and_are_not_replayed() {
        let d = tempfile::tempdir().unwrap();
        let report = Report::new(crate::status::Status::minimal("demo", "n1"));
        let cfg = PxeConfig { enrol: EnrolPolicy::Approve, ..Default::default() };
        let desk = Desk::new(cfg.clone(), report.clone(), d.path());
        let (_, p) = node();
        let req = Request {
            mac: "52:54:00:00:00:02".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            hostname: "lab-01".into(),
            key: hex::encode(p),
        };
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        assert!(matches!(desk.request(&secret(), &req, peer, 1000), Answer::Pending { .. }));
        let now_ms = 1_000_000;
        let forged =
            AdminRequest::new(&Secret::from_bytes([1; 32]), AdminAction::Approve { id: req.mac.clone() }, now_ms);
        assert!(desk.admin(&secret(), &forged, now_ms).is_err());
        let ok = AdminRequest::new(&secret(), AdminAction::Approve { id: fingerprint(&p) }, now_ms);
        assert_eq!(desk.admin(&secret(), &ok, now_ms).unwrap(), format!("approved key {}", fingerprint(&p)));
        assert!(desk.admin(&secret(), &ok, now_ms).unwrap_err().to_string().contains("replayed"));
        assert!(matches!(desk.request(&secret(), &req, peer, 1001), Answer::Admitted { .. }));
        // Approving a key admits that key only: another key claiming the same MAC still waits.
        let other_key = hex::encode(PublicKey::from(&StaticSecret::from([4; 32])).as_bytes());
        let spoof = Request { key: other_key.clone(), ..req.clone() };
        assert!(matches!(desk.request(&secret(), &spoof, "10.0.0.66".parse().unwrap(), 1002), Answer::Pending { .. }));
        let s = report.snapshot().enrol.expect("enrol status");
        assert_eq!((s.admitted, s.refused, s.policy.as_str()), (1, 1, "approve"));
        assert!(s.nodes.iter().any(|n| n.state == EnrolState::Admitted && n.fingerprint == fingerprint(&p)));
        // A window does not apply under approve; an unknown fingerprint is refused by name.
        let open = AdminRequest::new(&secret(), AdminAction::Open { seconds: 60 }, now_ms);
        assert!(desk.admin(&secret(), &open, now_ms).unwrap_err().to_string().contains("approval"));
        let typo = AdminRequest::new(&secret(), AdminAction::Approve { id: "0000-0000-00".into() }, now_ms);
        assert!(desk.admin(&secret(), &typo, now_ms).unwrap_err().to_string().contains("neither"));
        let early = AdminRequest::new(&secret(), AdminAction::Approve { id: "0000-0000-0000-0000".into() }, now_ms);
        assert!(desk.admin(&secret(), &early, now_ms).unwrap().contains("not seen yet"));
        // A MAC approval admits any key claiming it, and is kept (0600) for the master's next boot.
        let by_mac = AdminRequest::new(&secret(), AdminAction::Approve { id: "52:54:00:00:00:02".into() }, now_ms);
        assert!(desk.admin(&secret(), &by_mac, now_ms).unwrap().starts_with("approved MAC 52:54:00:00:00:02"));
        let file = d.path().join("enrol-approved.json");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let again = Desk::new(cfg, Report::new(crate::status::Status::minimal("demo", "n1")), d.path());
        assert!(matches!(
            again.request(&secret(), &Request { key: other_key, ..req }, peer, 5000),
            Answer::Admitted { .. }
        ));
    }

    #[test]
    fn the_window_opens_once_per_cluster_and_one_address_cannot_fill_the_list() {
        let d = tempfile::tempdir().unwrap();
        let report = Report::new(crate::status::Status::minimal("demo", "n1"));
        let cfg = PxeConfig { enrol_window: "10m".into(), ..Default::default() };
        Desk::new(cfg.clone(), report.clone(), d.path()).leading("uid-1", 1000);
        assert_eq!(report.snapshot().enrol.unwrap().window_until, 1600);
        // The agent restarts an hour later: the window of that cluster stays closed.
        Desk::new(cfg.clone(), report.clone(), d.path()).leading("uid-1", 4600);
        assert_eq!(report.snapshot().enrol.unwrap().window_until, 1600);
        // A new cluster gets its window.
        Desk::new(cfg.clone(), report.clone(), d.path()).leading("uid-2", 5000);
        assert_eq!(report.snapshot().enrol.unwrap().window_until, 5600);

        let desk = Desk::new(PxeConfig { enrol: EnrolPolicy::Approve, ..cfg }, report.clone(), d.path());
        let peer: IpAddr = "10.0.0.66".parse().unwrap();
        let ask = |n: u8| Request {
            mac: format!("52:54:00:00:00:{n:02x}"),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            hostname: "junk".into(),
            key: hex::encode(PublicKey::from(&StaticSecret::from([n; 32])).as_bytes()),
        };
        for n in 1..=MAX_PER_ADDRESS as u8 {
            assert!(matches!(desk.request(&secret(), &ask(n), peer, 10), Answer::Pending { .. }));
        }
        assert!(
            matches!(desk.request(&secret(), &ask(99), peer, 10), Answer::Denied { message } if message.contains("too many"))
        );
        // Asking again with a key it already has is fine.
        assert!(matches!(desk.request(&secret(), &ask(1), peer, 11), Answer::Pending { .. }));
        assert_eq!(report.snapshot().enrol.unwrap().nodes.len(), MAX_PER_ADDRESS);
    }
}
