//! Lab administrators get a kubeconfig on the master: root, and every user the image gives
//! sudo (the builder writes `/etc/sudoers.d/labforge-<name>` for each), each in their own
//! `~/.kube/config` (0600, owned by them), a copy of kubeadm's `admin.conf`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
pub const SUDOERS_D: &str = "/etc/sudoers.d";

/// root, then the users named by `labforge-<name>` files in `sudoers_d`, sorted.
pub fn admins(sudoers_d: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(sudoers_d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("labforge-").map(str::to_string))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)))
        .collect();
    names.sort();
    names.insert(0, "root".into());
    names
}

/// Copies `admin_conf` to `~/.kube/config` of every admin that exists on this system; returns
/// the files written. Unchanged files are left alone.
pub fn install(admin_conf: &Path, names: &[String]) -> Result<Vec<PathBuf>> {
    install_with(admin_conf, names, &|name| {
        nix::unistd::User::from_name(name).ok().flatten().map(|u| Account { home: u.dir, uid: u.uid, gid: u.gid })
    })
}

/// A user's home and ids.
pub struct Account {
    pub home: PathBuf,
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
}

/// [`install`], with users looked up by `lookup`.
pub fn install_with(
    admin_conf: &Path,
    names: &[String],
    lookup: &dyn Fn(&str) -> Option<Account>,
) -> Result<Vec<PathBuf>> {
    let conf = fs::read(admin_conf).with_context(|| format!("reading {}", admin_conf.display()))?;
    let mut written = Vec::new();
    for name in names {
        let Some(user) = lookup(name) else {
            tracing::warn!(%name, "no such user: no kubeconfig for them");
            continue;
        };
        // One admin's home that cannot be written to costs only that admin their kubeconfig.
        match write_one(&user, &conf) {
            Ok(Some(file)) => written.push(file),
            Ok(None) => {}
            Err(e) => tracing::warn!(%name, "no kubeconfig for them: {e:#}"),
        }
    }
    Ok(written)
}

/// Writes `conf` to the user's `~/.kube/config` (0600, theirs) unless it is there already.
fn write_one(user: &Account, conf: &[u8]) -> Result<Option<PathBuf>> {
    let dir = user.home.join(".kube");
    let file = dir.join("config");
    if fs::read(&file).ok().as_deref() == Some(conf) {
        return Ok(None);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).with_context(|| format!("chown {}", dir.display()))?;
    crate::sys::fs::write_durable_mode(&file, conf, 0o600)?;
    nix::unistd::chown(&file, Some(user.uid), Some(user.gid)).with_context(|| format!("chown {}", file.display()))?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_images_sudo_users_are_admins() {
        let d = tempfile::tempdir().unwrap();
        for f in ["labforge-ada", "labforge-bob", "README", "labforge-", "labforge-x y"] {
            fs::write(d.path().join(f), "").unwrap();
        }
        assert_eq!(admins(d.path()), ["root", "ada", "bob"]);
        assert_eq!(admins(&d.path().join("missing")), ["root"]);
    }

    #[test]
    fn each_admin_gets_a_private_copy_of_admin_conf() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("admin.conf");
        fs::write(&conf, "apiVersion: v1\nkind: Config\n").unwrap();
        let me = (nix::unistd::getuid(), nix::unistd::getgid());
        let lookup =
            |name: &str| (name != "ghost").then(|| Account { home: d.path().join(name), uid: me.0, gid: me.1 });
        let names: Vec<String> = ["root", "ada", "ghost"].map(String::from).to_vec();
        let written = install_with(&conf, &names, &lookup).unwrap();
        assert_eq!(written, [d.path().join("root/.kube/config"), d.path().join("ada/.kube/config")]);
        for f in &written {
            assert_eq!(fs::read(f).unwrap(), fs::read(&conf).unwrap());
            assert_eq!(fs::metadata(f).unwrap().mode() & 0o777, 0o600);
            assert_eq!(fs::metadata(f.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
            assert_eq!(fs::metadata(f).unwrap().uid(), me.0.as_raw());
        }
        assert!(install_with(&conf, &names, &lookup).unwrap().is_empty(), "unchanged files are left alone");
        let e = install_with(&d.path().join("none"), &names, &lookup).unwrap_err();
        assert!(format!("{e:#}").contains("reading"), "{e:#}");
    }
}
