//! Stage `system`: what makes the tree a labforge node: fstab and partition growth, users with
//! SSH keys, a fresh machine id per node, and the security checks every image must pass.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::disk::{ROOT_LABEL, STATE_LABEL};
use super::fsutil::{resolve_in_root, write_in_root};
use super::overlays::id_map;
use crate::cmd::Cmd;
use crate::spec::Spec;

pub fn configure(spec: &Spec, root: &Path) -> Result<()> {
    write(root, "etc/fstab", &fstab(), 0o644)?;
    // systemd-repart grows the last partition (state) into the free space of whatever disk the
    // image was written to; the definitions match the existing partitions in order.
    write(root, "etc/repart.d/10-esp.conf", "[Partition]\nType=esp\n", 0o644)?;
    write(root, "etc/repart.d/20-root.conf", "[Partition]\nType=root\n", 0o644)?;
    write(
        root,
        "etc/repart.d/30-state.conf",
        &format!("[Partition]\nType=linux-generic\nLabel={STATE_LABEL}\n"),
        0o644,
    )?;
    write(root, "etc/hostname", &format!("{}\n", spec.name), 0o644)?;
    // Empty machine-id: each node generates its own on first boot.
    write(root, "etc/machine-id", "", 0o444)?;
    let dbus_id = root.join("var/lib/dbus/machine-id");
    if dbus_id.symlink_metadata().is_ok_and(|m| m.is_file()) {
        fs::remove_file(&dbus_id)?;
        std::os::unix::fs::symlink("/etc/machine-id", &dbus_id)?;
    }
    // Host keys made while building would be shared by every node: drop them, the
    // labforge-ssh-keygen unit (base overlay) makes fresh ones on first boot.
    if let Ok(entries) = fs::read_dir(root.join("etc/ssh")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                fs::remove_file(e.path())?;
            }
        }
    }
    add_users(spec, root)?;
    check_security(root)
}

/// The disk's fstab. The state partition may take its time to show: systemd's default 90 s
/// for a device is less than a slow PC (or four emulated ones booting at once after a power
/// cut) needs to enumerate its disks, and a missed device means emergency mode, with no agent
/// and a locked root, on a PC nobody is watching.
fn fstab() -> String {
    format!(
        "# Written by labforge.\n\
         LABEL={ROOT_LABEL} / ext4 defaults,errors=remount-ro 0 1\n\
         LABEL={STATE_LABEL} /var/lib/labforge ext4 defaults,x-systemd.growfs,x-systemd.after=systemd-repart.service,x-systemd.device-timeout=10min 0 2\n"
    )
}

fn write(root: &Path, rel: &str, contents: &str, mode: u32) -> Result<()> {
    write_in_root(root, rel, contents.as_bytes(), mode)
}

fn add_users(spec: &Spec, root: &Path) -> Result<()> {
    if spec.users.is_empty() {
        return Ok(());
    }
    let existing_groups = id_map(&root.join("etc/group"))?;
    for user in &spec.users {
        let mut cmd = Cmd::new("useradd").arg(format!("--root={}", root.display())).args([
            "--create-home",
            "--shell",
            "/bin/bash",
        ]);
        let groups: Vec<&str> = user
            .groups
            .iter()
            .map(String::as_str)
            .filter(|g| {
                let known = existing_groups.contains_key(*g);
                if !known {
                    tracing::warn!(user = %user.name, group = %g, "group does not exist in the image; skipped");
                }
                known
            })
            .collect();
        if !groups.is_empty() {
            cmd = cmd.arg("--groups").arg(groups.join(","));
        }
        cmd.arg(&user.name).run().with_context(|| format!("creating user {}", user.name))?;
        let passwd = id_map(&root.join("etc/passwd"))?;
        let uid = passwd[&user.name];
        let home = resolve_in_root(root, Path::new(&format!("home/{}", user.name)))?;
        let ssh = home.join(".ssh");
        fs::create_dir_all(&ssh)?;
        let mut keys = String::new();
        for k in &user.ssh_authorized_keys {
            writeln!(keys, "{k}").expect("string write");
        }
        fs::write(ssh.join("authorized_keys"), keys)?;
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))?;
        fs::set_permissions(ssh.join("authorized_keys"), fs::Permissions::from_mode(0o600))?;
        let gid = fs::metadata(&home)?.gid();
        for p in [&ssh, &ssh.join("authorized_keys")] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
        }
        if user.sudo {
            write(
                root,
                &format!("etc/sudoers.d/labforge-{}", user.name),
                &format!("{} ALL=(ALL) NOPASSWD:ALL\n", user.name),
                0o440,
            )?;
        }
    }
    write(
        root,
        "etc/ssh/sshd_config.d/labforge.conf",
        "# Written by labforge: keys only.\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n",
        0o644,
    )
}

/// Refuses an image in which an account can log in with a password (or none), or in which
/// anything under /etc or /usr is world-writable.
pub fn check_security(root: &Path) -> Result<()> {
    let shadow = root.join("etc/shadow");
    let text = fs::read_to_string(&shadow).with_context(|| format!("reading {}", shadow.display()))?;
    for line in text.lines() {
        let mut f = line.split(':');
        let (Some(name), Some(hash)) = (f.next(), f.next()) else { continue };
        if !(hash.starts_with('*') || hash.starts_with('!')) {
            bail!("account {name:?} in the image has a password (or an empty one); labforge images allow SSH keys only — remove the password from the overlay or package that sets it");
        }
    }
    for top in ["etc", "usr"] {
        for e in walkdir::WalkDir::new(root.join(top)) {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            if !m.file_type().is_symlink() && m.mode() & 0o002 != 0 && m.mode() & 0o1000 == 0 {
                bail!(
                    "{} is world-writable in the image; fix its mode in the overlay or with [files] in the spec",
                    e.path().strip_prefix(root).unwrap_or(e.path()).display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_accounts_are_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::create_dir_all(d.path().join("usr")).unwrap();
        fs::write(d.path().join("etc/shadow"), "root:*:1::::::\nada:!:1::::::\n").unwrap();
        check_security(d.path()).unwrap();
        fs::write(d.path().join("etc/shadow"), "root:*:1::::::\nbob::1::::::\n").unwrap();
        let err = check_security(d.path()).unwrap_err().to_string();
        assert!(err.contains("\"bob\""), "{err}");
    }

    #[test]
    fn world_writable_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::create_dir_all(d.path().join("usr")).unwrap();
        fs::write(d.path().join("etc/shadow"), "root:*:1::::::\n").unwrap();
        fs::write(d.path().join("etc/open"), "").unwrap();
        fs::set_permissions(d.path().join("etc/open"), fs::Permissions::from_mode(0o666)).unwrap();
        let err = check_security(d.path()).unwrap_err().to_string();
        assert!(err.contains("etc/open"), "{err}");
    }
}
