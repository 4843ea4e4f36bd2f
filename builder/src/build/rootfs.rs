//! Stage `rootfs`: the distribution's packages, installed by mmdebstrap into a tarball that is
//! cached by the hash of its inputs, then unpacked for the later stages.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::cmd::Cmd;
use crate::spec::{Pin, Spec};

/// Bump when the way the rootfs is produced changes, so old cache entries are not reused.
const STAGE_VERSION: &str = "rootfs-v2";

/// Where a repository's signing key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    Url(String),
}

#[derive(Debug, Clone)]
pub struct RepoPlan {
    /// `deb [signed-by=…] uri suite components`
    pub line: String,
    pub key: KeySource,
    pub fingerprint: Option<String>,
    /// Where the key lives in the image.
    pub key_in_image: String,
}

/// What goes into the rootfs, and nothing else: the cache key is the hash of this.
pub struct RootfsPlan {
    pub suite: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub keyring: PathBuf,
    pub packages: Vec<String>,
    pub repositories: Vec<RepoPlan>,
    pub pins: Vec<Pin>,
}

impl RootfsPlan {
    pub fn new(spec: &Spec) -> Self {
        let repositories = spec
            .base
            .repositories
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let key = match (&r.key, &r.key_url) {
                    (Some(p), _) => KeySource::File(p.clone()),
                    (None, Some(u)) => KeySource::Url(u.clone()),
                    (None, None) => unreachable!("validated at load: a repository has a key"),
                };
                let armored = match &key {
                    KeySource::File(p) => p.extension().is_some_and(|e| e == "asc"),
                    KeySource::Url(_) => true,
                };
                let key_in_image =
                    format!("/etc/apt/keyrings/labforge-repo-{i}.{}", if armored { "asc" } else { "gpg" });
                let line = format!("deb [signed-by={key_in_image}] {} {} {}", r.uri, r.suite, r.components.join(" "));
                RepoPlan {
                    line: line.trim_end().to_string(),
                    key,
                    fingerprint: r.key_fingerprint.as_ref().map(|f| f.replace(' ', "").to_uppercase()),
                    key_in_image,
                }
            })
            .collect();
        RootfsPlan {
            suite: spec.base.suite.clone(),
            mirror: spec.base.mirror().to_string(),
            components: spec.base.components(),
            keyring: spec.base.keyring(),
            packages: spec.install_packages(),
            repositories,
            pins: spec.pins.clone(),
        }
    }

    /// Checks what can be checked before downloading anything.
    pub fn preflight(&self) -> Result<()> {
        if !self.keyring.is_file() {
            bail!(
                "archive keyring {} does not exist; install the distribution's keyring package \
                 (debian-archive-keyring or ubuntu-keyring) or set base.keyring in the spec",
                self.keyring.display()
            );
        }
        Ok(())
    }

    /// Hash of every input; names the cache entry.
    pub fn cache_key(&self) -> Result<String> {
        let mut h = Sha256::new();
        h.update(STAGE_VERSION);
        h.update(format!("\0{}\0{}\0{}\0", self.suite, self.mirror, self.components.join(",")));
        h.update(fs::read(&self.keyring).with_context(|| format!("reading keyring {}", self.keyring.display()))?);
        for p in &self.packages {
            h.update(format!("\0pkg {p}"));
        }
        for pin in &self.pins {
            h.update(format!("\0pin {} {}", pin.packages.join(","), pin.version));
        }
        for r in &self.repositories {
            h.update(format!("\0repo {}\0{:?}\0", r.line, r.fingerprint));
            match &r.key {
                KeySource::File(p) => {
                    h.update(fs::read(p).with_context(|| format!("reading repository key {}", p.display()))?)
                }
                // A fetched key is identified by its URL and pinned fingerprint.
                KeySource::Url(u) => h.update(u.as_bytes()),
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Fetches and checks the repository keys and writes the apt files the install needs into
    /// `dir`. Returns `(file outside, path inside the image)` pairs for mmdebstrap to upload.
    pub fn prepare(&self, dir: &Path) -> Result<Vec<(PathBuf, String)>> {
        let mut uploads = Vec::new();
        for (i, r) in self.repositories.iter().enumerate() {
            let local = match &r.key {
                KeySource::File(p) => p.clone(),
                KeySource::Url(url) => {
                    let dest = dir.join(format!("repo-key-{i}"));
                    Cmd::new("curl")
                        .args([
                            "--fail",
                            "--silent",
                            "--show-error",
                            "--location",
                            "--max-time",
                            "60",
                            "--proto",
                            "=https,http",
                            "-o",
                        ])
                        .arg(&dest)
                        .arg(url)
                        .run()
                        .with_context(|| format!("fetching repository key {url}"))?;
                    dest
                }
            };
            if let Some(fp) = &r.fingerprint {
                verify_fingerprint(&local, fp, dir)?;
            }
            uploads.push((local, r.key_in_image.clone()));
            let list = dir.join(format!("labforge-repo-{i}.list"));
            fs::write(&list, format!("{}\n", r.line))?;
            uploads.push((list, format!("/etc/apt/sources.list.d/labforge-repo-{i}.list")));
        }
        if !self.pins.is_empty() {
            let prefs = dir.join("labforge-pins");
            let text: String = self
                .pins
                .iter()
                .map(|p| {
                    format!("Package: {}\nPin: version {}\nPin-Priority: 1001\n\n", p.packages.join(" "), p.version)
                })
                .collect();
            fs::write(&prefs, text)?;
            uploads.push((prefs, "/etc/apt/preferences.d/labforge-pins".into()));
        }
        Ok(uploads)
    }

    /// The mmdebstrap invocation that writes the rootfs tarball to `out`.
    pub fn command(&self, out: &Path, tmp: &Path, uploads: &[(PathBuf, String)]) -> Cmd {
        let mut cmd = Cmd::new("mmdebstrap")
            .env("TMPDIR", tmp)
            .arg("--mode=root")
            .arg("--variant=apt")
            .arg("--format=tar")
            .arg(format!("--keyring={}", self.keyring.display()))
            .arg(format!("--components={}", self.components.join(",")))
            .arg(format!("--include={}", self.packages.join(",")));
        if !uploads.is_empty() {
            cmd = cmd.arg("--setup-hook=mkdir -p \"$1/etc/apt/keyrings\" \"$1/etc/apt/preferences.d\" \"$1/etc/apt/sources.list.d\"");
        }
        for (local, inside) in uploads {
            cmd = cmd.arg(format!("--setup-hook=upload {} {inside}", local.display()));
        }
        let held: Vec<&str> = self.pins.iter().flat_map(|p| p.packages.iter().map(String::as_str)).collect();
        if !held.is_empty() {
            // Names are validated Debian package names, safe in a hook's shell line.
            cmd = cmd.arg(format!("--customize-hook=chroot \"$1\" apt-mark hold {}", held.join(" ")));
        }
        cmd.arg(&self.suite).arg(out).arg(&self.mirror)
    }
}

/// Checks that `key` holds a primary key with fingerprint `want` (and nothing else).
pub fn verify_fingerprint(key: &Path, want: &str, scratch: &Path) -> Result<()> {
    let home = scratch.join("gnupg");
    fs::create_dir_all(&home)?;
    fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let listing = Cmd::new("gpg")
        .arg("--homedir")
        .arg(&home)
        .args(["--batch", "--with-colons", "--show-keys"])
        .arg(key)
        .run()
        .with_context(|| format!("reading OpenPGP key {}", key.display()))?;
    let mut primaries = Vec::new();
    let mut after_pub = false;
    for line in listing.lines() {
        let f: Vec<&str> = line.split(':').collect();
        match f.first() {
            Some(&"pub") => after_pub = true,
            Some(&"fpr") if after_pub => {
                primaries.push(f.get(9).copied().unwrap_or_default().to_uppercase());
                after_pub = false;
            }
            _ => {}
        }
    }
    if primaries.len() != 1 || primaries[0] != want {
        bail!(
            "repository key {} has fingerprint(s) {:?}, but the spec pins {want}; refusing to trust it",
            key.display(),
            primaries
        );
    }
    Ok(())
}

/// Returns the cached tarball for `plan`, running mmdebstrap on a miss.
pub fn ensure(plan: &RootfsPlan, cache_dir: &Path, work: &Path) -> Result<(PathBuf, bool)> {
    let key = plan.cache_key()?;
    let dir = cache_dir.join("rootfs");
    let tar = dir.join(format!("{key}.tar"));
    fs::create_dir_all(&dir).with_context(|| format!("creating cache dir {}", dir.display()))?;
    // Concurrent builds of the same rootfs wait for the first instead of running mmdebstrap twice.
    let lock = fs::File::create(dir.join(format!("{key}.lock")))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("locking the rootfs cache entry")?;
    if tar.is_file() {
        tracing::info!(cache = %tar.display(), "rootfs: reusing cached root filesystem");
        // The modification time records the last use, for pruning.
        let _ = fs::File::options().append(true).open(&tar).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        return Ok((tar, true));
    }
    let tmp = work.join("mmdebstrap-tmp");
    fs::create_dir_all(&tmp)?;
    let uploads = plan.prepare(work)?;
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .suffix(".tar")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in cache dir {}", dir.display()))?;
    tracing::info!(suite = %plan.suite, mirror = %plan.mirror, packages = plan.packages.len(), "rootfs: installing packages with mmdebstrap");
    let result = plan.command(partial.path(), &tmp, &uploads).run();
    crate::build::fsutil::unmount_below(&tmp)?;
    result.map_err(|e| explain_mmdebstrap_failure(e, plan))?;
    partial.persist(&tar).with_context(|| format!("storing {}", tar.display()))?;
    prune(&dir, KEEP_ROOTFS);
    Ok((tar, false))
}

/// Root filesystems kept in the cache (each ~1 GB); the least recently used go first.
const KEEP_ROOTFS: usize = 4;

/// Removes all but the `keep` most recently used rootfs tarballs that no build is using.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut tars: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "tar")
                && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    tars.sort_by_key(|t| std::cmp::Reverse(t.0));
    for (_, tar) in tars.into_iter().skip(keep) {
        let lock = tar.with_extension("lock");
        let Ok(f) = fs::File::create(&lock) else { continue };
        // A build holding this entry's lock is using it: keep it.
        if let Ok(_held) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            tracing::info!(entry = %tar.display(), "pruning least recently used rootfs from the cache");
            let _ = fs::remove_file(&tar);
            let _ = fs::remove_file(&lock);
        }
    }
}

fn explain_mmdebstrap_failure(e: anyhow::Error, plan: &RootfsPlan) -> anyhow::Error {
    if crate::interrupt::is_interrupted(&e) {
        return e;
    }
    let text = format!("{e:#}");
    let unreachable = [
        "Failed to fetch",
        "Could not connect",
        "Temporary failure resolving",
        "Unable to connect",
        "Connection refused",
        "apt-get update failed",
    ];
    if unreachable.iter().any(|s| text.contains(s)) {
        e.context(format!(
            "the package mirror {} could not be reached or lacks suite {}; check the URL and the network, or pass --mirror",
            plan.mirror, plan.suite
        ))
    } else if text.contains("Unable to locate package") || text.contains("has no installation candidate") {
        e.context("a package in the spec does not exist in this suite; check `packages` in the spec")
    } else {
        e.context("installing the root filesystem with mmdebstrap")
    }
}

/// Unpacks the tarball into `dest` (which must not exist), preserving owners, modes and xattrs.
pub fn unpack(tar: &Path, dest: &Path) -> Result<()> {
    fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
    Cmd::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(tar)
        .arg("-C")
        .arg(dest)
        .run()
        .with_context(|| format!("unpacking cached root filesystem {}", tar.display()))?;
    Ok(())
}

/// Installed packages and versions, from dpkg's status file in the rootfs.
pub fn installed_packages(root: &Path) -> Result<BTreeMap<String, String>> {
    let status = root.join("var/lib/dpkg/status");
    let text = fs::read_to_string(&status).with_context(|| format!("reading {}", status.display()))?;
    Ok(parse_dpkg_status(&text))
}

fn parse_dpkg_status(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')).map(str::trim))
        };
        if let (Some(p), Some(v), Some(s)) = (field("Package"), field("Version"), field("Status")) {
            if s.ends_with(" installed") {
                out.insert(p.to_string(), v.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
