use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use super::*;

/// What the test mirror serves, by path.
type Files = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;

/// A loopback HTTP server holding `files` by path (404 for anything else); returns its base URL.
pub(crate) fn serve(files: BTreeMap<String, Vec<u8>>) -> (String, Files) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let files = Arc::new(Mutex::new(files));
    let shared = files.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let body = shared.lock().unwrap().get(&path).cloned();
            let _ = match body {
                Some(b) => conn
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())
                            .as_bytes(),
                    )
                    .and_then(|_| conn.write_all(&b)),
                None => conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            };
        }
    });
    (base, files)
}

pub(crate) fn hex_sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A CNI plugins tarball with one plugin in it.
fn cni_tgz() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("bridge"), b"#!/bin/sh\necho bridge\n").unwrap();
    fs::set_permissions(d.path().join("bridge"), fs::Permissions::from_mode(0o755)).unwrap();
    let out = d.path().join("cni.tgz");
    let st =
        std::process::Command::new("tar").arg("-czf").arg(&out).arg("-C").arg(d.path()).arg("bridge").status().unwrap();
    assert!(st.success());
    fs::read(out).unwrap()
}

/// A mirror laid out as the release site, for `version` and CNI v1.10.0.
fn mirror(version: &str) -> (KubernetesSpec, Files) {
    let mut files = BTreeMap::new();
    for p in PROGRAMS {
        // kubeadm answers `config images list` as the real one does: one reference a line.
        let list = "if [ \"$1 $2 $3 $4\" = \"config images list --kubernetes-version\" ]; then\n  \
                    repo=registry.k8s.io; [ \"$6\" = --image-repository ] && repo=$7\n  \
                    echo $repo/kube-apiserver:$5; echo $repo/pause:3.10.2; exit 0\nfi\n";
        let body = format!("#!/bin/sh\n{}echo {p} {version}\n", if p == "kubeadm" { list } else { "" }).into_bytes();
        let path = format!("/release/{version}/bin/linux/amd64/{p}");
        files.insert(format!("{path}.sha256"), hex_sha(&body).into_bytes());
        files.insert(path, body);
    }
    let tgz = cni_tgz();
    let path = "/cni/v1.10.0/cni-plugins-linux-amd64-v1.10.0.tgz".to_string();
    files.insert(
        format!("{path}.sha256"),
        format!("{}  cni-plugins-linux-amd64-v1.10.0.tgz\n", hex_sha(&tgz)).into_bytes(),
    );
    files.insert(path, tgz);
    let (base, files) = serve(files);
    let k = KubernetesSpec {
        enabled: true,
        version: version.into(),
        source: KubernetesSource::Binaries,
        binaries_url: format!("{base}/release/"),
        cni_version: "v1.10.0".into(),
        cni_url: format!("{base}/cni"),
        ..Default::default()
    };
    (k, files)
}

#[test]
fn the_layout_is_upstreams_and_packages_want_nothing() {
    let k = KubernetesSpec { version: "v1.36.5".into(), source: KubernetesSource::Binaries, ..Default::default() };
    let w = wanted(&k);
    assert_eq!(w[0], ("kubeadm".to_string(), "https://dl.k8s.io/release/v1.36.5/bin/linux/amd64/kubeadm".to_string()));
    assert_eq!(
        w[3].1,
        "https://github.com/containernetworking/plugins/releases/download/v1.10.0/cni-plugins-linux-amd64-v1.10.0.tgz"
    );
    assert!(wanted(&KubernetesSpec { source: KubernetesSource::Packages, ..k }).is_empty());
}

#[test]
fn sum_files_hold_one_digest() {
    let h = "ab".repeat(32);
    assert_eq!(parse_sum(&h).unwrap(), h);
    assert_eq!(parse_sum(&format!("{}  kubeadm\n", h.to_uppercase())).unwrap(), h);
    for bad in ["", "abc", "<html>not found</html>", &"z".repeat(64)] {
        assert!(parse_sum(bad).is_err(), "{bad:?}");
    }
    assert!(parse_sum(&format!("{h}{}", " ".repeat(5000))).is_err(), "bounded");
}

#[test]
fn release_files_are_pinned_fetched_verified_and_installed() {
    let (k, files) = mirror("v1.36.5");
    let pins = resolve(&k, &LockFile::default()).unwrap();
    assert_eq!(pins.len(), 4);
    assert!(pins.iter().all(|p| p.sha256.len() == 64));
    // The lock is used as is: a pin differing from the mirror's sums is what is checked.
    let lock = LockFile { image: vec![], file: locked(&pins) };
    assert_eq!(resolve(&k, &lock).unwrap(), pins);

    let cache = tempfile::tempdir().unwrap();
    let got = fetch_all(&pins, cache.path()).unwrap();
    for (p, f) in pins.iter().zip(&got) {
        assert_eq!(sha256_file(f).unwrap(), p.sha256, "{}", p.name);
    }
    // Cached: served nothing the second time (the mirror's files are gone).
    let saved = std::mem::take(&mut *files.lock().unwrap());
    assert_eq!(fetch_all(&pins, cache.path()).unwrap(), got);

    let root = tempfile::tempdir().unwrap();
    install(root.path(), &pins, &got).unwrap();
    for p in PROGRAMS {
        let f = root.path().join("usr/bin").join(p);
        assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o755, "{p}");
        assert!(fs::read_to_string(&f).unwrap().contains(&format!("echo {p} v1.36.5")));
    }
    assert!(root.path().join("opt/cni/bin/bridge").is_file(), "the CNI plugins are unpacked");
    let dropin =
        fs::read_to_string(root.path().join("usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf")).unwrap();
    assert!(dropin.contains("EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env"), "{dropin}");
    assert!(
        // A link to /usr/lib/… inside the image (dangling on the host).
        fs::symlink_metadata(root.path().join("etc/systemd/system/multi-user.target.wants/kubelet.service")).is_ok(),
        "kubelet is enabled"
    );
    *files.lock().unwrap() = saved;
}

#[test]
fn a_changed_file_fails_naming_it_and_leaves_nothing() {
    let (k, files) = mirror("v1.36.5");
    let pins = resolve(&k, &LockFile::default()).unwrap();
    files.lock().unwrap().insert("/release/v1.36.5/bin/linux/amd64/kubelet".into(), b"tampered".to_vec());
    let cache = tempfile::tempdir().unwrap();
    let e = format!("{:#}", fetch_all(&pins, cache.path()).unwrap_err());
    assert!(e.contains("kubelet from http://") && e.contains("is pinned"), "{e}");
    let left: Vec<_> = fs::read_dir(cache.path().join("binaries/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let kubelet = &pins.iter().find(|p| p.name == "kubelet").unwrap().sha256;
    assert!(!left.contains(kubelet), "no kubelet in the cache: {left:?}");
    assert!(left.iter().all(|f| f.len() == 64), "no partial file: {left:?}");
}

#[test]
fn a_version_without_release_files_is_refused_before_the_build() {
    let (mut k, _files) = mirror("v1.36.5");
    k.version = "v1.36.99".into();
    let e = format!("{:#}", resolve(&k, &LockFile::default()).unwrap_err());
    assert!(e.contains("Kubernetes v1.36.99 has no kubeadm at http://"), "{e}");
    assert!(e.contains("404"), "{e}");
    k.binaries_url = "http://127.0.0.1:9/release".into();
    let e = format!("{:#}", resolve(&k, &LockFile::default()).unwrap_err());
    assert!(e.contains("has no kubeadm at http://127.0.0.1:9/release/v1.36.99/bin/linux/amd64/kubeadm"), "{e}");
}

#[test]
fn the_control_plane_images_are_what_the_pinned_kubeadm_lists() {
    let (mut k, _files) = mirror("v1.36.5");
    let pins = resolve(&k, &LockFile::default()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    assert_eq!(
        control_plane_images(&k, &pins, cache.path()).unwrap(),
        ["registry.k8s.io/kube-apiserver:v1.36.5", "registry.k8s.io/pause:3.10.2"]
    );
    k.image_repository = "registry.lab:5000/k8s".into();
    assert_eq!(
        control_plane_images(&k, &pins, cache.path()).unwrap(),
        ["registry.lab:5000/k8s/kube-apiserver:v1.36.5", "registry.lab:5000/k8s/pause:3.10.2"]
    );
    assert!(control_plane_images(&k, &[], cache.path()).unwrap().is_empty(), "no kubeadm, no list");
    assert!(parse_image_list("\n").is_err(), "an empty list is an error");
    assert!(parse_image_list("registry.k8s.io/pause:3.10.2\nW1202 warning: something\n").is_err());
}

#[test]
fn a_root_filesystems_kubeadm_names_the_control_plane_images() {
    let root = tempfile::tempdir().unwrap();
    let k = KubernetesSpec { enabled: true, version: "v1.36.5".into(), ..Default::default() };
    assert!(images_of_root(root.path(), &k).unwrap().is_empty(), "no kubeadm in the image: nothing to mark");
    let bin = root.path().join("usr/bin");
    fs::create_dir_all(&bin).unwrap();
    let script = "#!/bin/sh\n[ \"$1 $2 $3 $4 $5\" = \"config images list --kubernetes-version v1.36.5\" ] || exit 3\n\
                  repo=registry.k8s.io; [ \"$6\" = --image-repository ] && repo=$7\n\
                  echo $repo/kube-apiserver:$5; echo $repo/pause:3.10.2\n";
    fs::write(bin.join("kubeadm"), script).unwrap();
    // Installed as the package left it (not ours to chmod): a private copy runs.
    fs::set_permissions(bin.join("kubeadm"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        images_of_root(root.path(), &k).unwrap(),
        ["registry.k8s.io/kube-apiserver:v1.36.5", "registry.k8s.io/pause:3.10.2"]
    );
    let site = KubernetesSpec { image_repository: "registry.lab:5000/k8s".into(), ..k.clone() };
    assert_eq!(images_of_root(root.path(), &site).unwrap()[0], "registry.lab:5000/k8s/kube-apiserver:v1.36.5");
    let other = KubernetesSpec { version: "v1.35.0".into(), ..k };
    let err = format!("{:#}", images_of_root(root.path(), &other).unwrap_err());
    assert!(err.contains("v1.35.0"), "{err}");
}
