//! Stage `rootfs`: the distribution's packages, installed by mmdebstrap into a tarball that is
//! cached by the hash of its inputs, then unpacked for the later stages.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::cmd::Cmd;
use crate::spec::Spec;

/// Bump when the way the rootfs is produced changes, so old cache entries are not reused.
const STAGE_VERSION: &str = "rootfs-v1";

/// What goes into the rootfs, and nothing else: the cache key is the hash of this.
pub struct RootfsPlan {
    pub suite: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub keyring: PathBuf,
    pub packages: Vec<String>,
    /// `deb [signed-by=...] uri suite components` lines for extra repositories, with key paths.
    pub repositories: Vec<(String, PathBuf)>,
}

impl RootfsPlan {
    pub fn new(spec: &Spec) -> Self {
        let repositories = spec
            .base
            .repositories
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let key_in_image = format!("/etc/apt/keyrings/labforge-repo-{i}.{}", key_ext(&r.key));
                let line = format!(
                    "deb [signed-by={key_in_image}] {} {} {}",
                    r.uri,
                    r.suite,
                    r.components.join(" ")
                );
                (line.trim_end().to_string(), r.key.clone())
            })
            .collect();
        RootfsPlan {
            suite: spec.base.suite.clone(),
            mirror: spec.base.mirror().to_string(),
            components: spec.base.components(),
            keyring: spec.base.keyring(),
            packages: spec.install_packages(),
            repositories,
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
        for (_, key) in &self.repositories {
            if !key.is_file() {
                bail!("repository key {} does not exist", key.display());
            }
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
        for (line, key) in &self.repositories {
            h.update(format!("\0repo {line}\0"));
            h.update(fs::read(key).with_context(|| format!("reading repository key {}", key.display()))?);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// The mmdebstrap invocation that writes the rootfs tarball to `out`.
    pub fn command(&self, out: &Path, tmp: &Path) -> Cmd {
        let mut cmd = Cmd::new("mmdebstrap")
            .env("TMPDIR", tmp)
            .arg("--mode=root")
            .arg("--variant=apt")
            .arg("--format=tar")
            .arg(format!("--keyring={}", self.keyring.display()))
            .arg(format!("--components={}", self.components.join(",")))
            .arg(format!("--include={}", self.packages.join(",")));
        for (i, (line, key)) in self.repositories.iter().enumerate() {
            let dest = format!("/etc/apt/keyrings/labforge-repo-{i}.{}", key_ext(key));
            cmd = cmd
                .arg(format!("--setup-hook=mkdir -p \"$1/etc/apt/keyrings\" && cp {} \"$1{dest}\"", shell_quote(&key.to_string_lossy())))
                .arg(format!("--setup-hook=echo {} >> \"$1/etc/apt/sources.list\"", shell_quote(line)));
        }
        cmd.arg(&self.suite).arg(out).arg(&self.mirror)
    }
}

fn key_ext(p: &Path) -> &'static str {
    if p.extension().is_some_and(|e| e == "asc") { "asc" } else { "gpg" }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Returns the cached tarball for `plan`, running mmdebstrap on a miss.
pub fn ensure(plan: &RootfsPlan, cache_dir: &Path, work: &Path) -> Result<(PathBuf, bool)> {
    let key = plan.cache_key()?;
    let dir = cache_dir.join("rootfs");
    let tar = dir.join(format!("{key}.tar"));
    if tar.is_file() {
        tracing::info!(cache = %tar.display(), "rootfs: reusing cached root filesystem");
        return Ok((tar, true));
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating cache dir {}", dir.display()))?;
    let tmp = work.join("mmdebstrap-tmp");
    fs::create_dir_all(&tmp)?;
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .suffix(".tar")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in cache dir {}", dir.display()))?;
    tracing::info!(suite = %plan.suite, mirror = %plan.mirror, packages = plan.packages.len(), "rootfs: installing packages with mmdebstrap");
    let result = plan.command(partial.path(), &tmp).run();
    crate::build::fsutil::unmount_below(&tmp)?;
    result.map_err(|e| explain_mmdebstrap_failure(e, plan))?;
    partial.persist(&tar).with_context(|| format!("storing {}", tar.display()))?;
    Ok((tar, false))
}

fn explain_mmdebstrap_failure(e: anyhow::Error, plan: &RootfsPlan) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Failed to fetch") || text.contains("Could not connect") || text.contains("Temporary failure resolving") || text.contains("Unable to connect") || text.contains("apt-get update") && text.contains("failed") {
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
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_lists_installed_packages_only() {
        let text = "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b2\n\n\
                    Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n\n\
                    Package: zstd\nVersion: 1.5.4+dfsg2-5\nStatus: install ok installed\n";
        let p = parse_dpkg_status(text);
        assert_eq!(p.len(), 2);
        assert_eq!(p["bash"], "5.2.15-2+b2");
        assert_eq!(p["zstd"], "1.5.4+dfsg2-5");
    }

    #[test]
    fn cache_key_changes_with_packages_not_with_order() {
        let d = tempfile::tempdir().unwrap();
        let keyring = d.path().join("k.gpg");
        fs::write(&keyring, b"key").unwrap();
        let plan = |pk: &[&str]| RootfsPlan {
            suite: "bookworm".into(),
            mirror: "http://m".into(),
            components: vec!["main".into()],
            keyring: keyring.clone(),
            packages: { let mut v: Vec<String> = pk.iter().map(|s| s.to_string()).collect(); v.sort(); v },
            repositories: vec![],
        };
        assert_eq!(plan(&["a", "b"]).cache_key().unwrap(), plan(&["b", "a"]).cache_key().unwrap());
        assert_ne!(plan(&["a"]).cache_key().unwrap(), plan(&["a", "b"]).cache_key().unwrap());
    }
}
