use super::*;
use std::process::Command;

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

fn plan(keyring: &Path, packages: &[&str]) -> RootfsPlan {
    let mut packages: Vec<String> = packages.iter().map(|s| s.to_string()).collect();
    packages.sort();
    RootfsPlan {
        suite: "bookworm".into(),
        mirror: "http://m".into(),
        components: vec!["main".into()],
        keyring: keyring.to_path_buf(),
        packages,
        repositories: vec![],
        pins: vec![],
    }
}

#[test]
fn cache_key_changes_with_packages_not_with_order() {
    let d = tempfile::tempdir().unwrap();
    let keyring = d.path().join("k.gpg");
    fs::write(&keyring, b"key").unwrap();
    assert_eq!(plan(&keyring, &["a", "b"]).cache_key().unwrap(), plan(&keyring, &["b", "a"]).cache_key().unwrap());
    assert_ne!(plan(&keyring, &["a"]).cache_key().unwrap(), plan(&keyring, &["a", "b"]).cache_key().unwrap());
    fs::write(&keyring, b"other key").unwrap();
    assert_ne!(plan(&keyring, &["a"]).cache_key().unwrap(), plan(&keyring, &["a", "b"]).cache_key().unwrap());
}

/// Makes a throw-away OpenPGP key and returns (exported key file, fingerprint).
fn make_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let home = dir.join(format!("home-{name}"));
    fs::create_dir_all(&home).unwrap();
    fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gpg = |args: &[&str]| {
        let out = Command::new("gpg").arg("--homedir").arg(&home).arg("--batch").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    gpg(&["--passphrase", "", "--quick-gen-key", &format!("{name} <{name}@test.invalid>"), "ed25519", "sign", "never"]);
    let listing = gpg(&["--with-colons", "--list-keys"]);
    let fpr = listing.lines().find(|l| l.starts_with("fpr:")).unwrap().split(':').nth(9).unwrap().to_string();
    let file = dir.join(format!("{name}.asc"));
    gpg(&["--armor", "--output", file.to_str().unwrap(), "--export", &fpr]);
    (file, fpr)
}

#[test]
fn fingerprint_pin_accepts_the_right_key_and_refuses_another() {
    let d = tempfile::tempdir().unwrap();
    let (good, fpr) = make_key(d.path(), "good");
    let (evil, _) = make_key(d.path(), "evil");
    verify_fingerprint(&good, &fpr, d.path()).unwrap();
    let err = verify_fingerprint(&evil, &fpr, d.path()).unwrap_err();
    assert!(format!("{err:#}").contains("refusing to trust it"), "{err:#}");
    let junk = d.path().join("junk");
    fs::write(&junk, "not a key").unwrap();
    assert!(verify_fingerprint(&junk, &fpr, d.path()).is_err());
}

#[test]
fn pins_become_apt_preferences_and_holds() {
    let d = tempfile::tempdir().unwrap();
    let keyring = d.path().join("k.gpg");
    fs::write(&keyring, b"key").unwrap();
    let mut p = plan(&keyring, &["kubeadm"]);
    p.pins = vec![Pin { packages: vec!["kubeadm".into(), "kubelet".into()], version: "1.31.*".into() }];
    let uploads = p.prepare(d.path()).unwrap();
    let (local, inside) = &uploads[0];
    assert_eq!(inside, "/etc/apt/preferences.d/labforge-pins");
    assert_eq!(
        fs::read_to_string(local).unwrap(),
        "Package: kubeadm kubelet\nPin: version 1.31.*\nPin-Priority: 1001\n\n"
    );
    let cmd = p.command(Path::new("out.tar"), d.path(), &uploads).display();
    assert!(cmd.contains("apt-mark hold kubeadm kubelet"), "{cmd}");
}

#[test]
fn prune_keeps_the_most_recently_used() {
    let d = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now();
    for (i, name) in ["old", "mid", "new"].iter().enumerate() {
        let p = d.path().join(format!("{name}.tar"));
        fs::write(&p, name).unwrap();
        let f = fs::File::options().append(true).open(&p).unwrap();
        f.set_modified(now - std::time::Duration::from_secs(1000 * (3 - i as u64))).unwrap();
    }
    fs::write(d.path().join(".partial-x.tar"), "in progress").unwrap();
    prune(d.path(), 2);
    assert!(!d.path().join("old.tar").exists());
    assert!(d.path().join("mid.tar").exists() && d.path().join("new.tar").exists());
    assert!(d.path().join(".partial-x.tar").exists(), "another build's partial file is not touched");
}
