//! Pulling preload images from a real registry (Debian's `docker-registry` on 127.0.0.1), and
//! every way a registry can misbehave, through the builder's registry client and the `labforge`
//! binary.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use anyhow::Result;
use labforge::registry::{Registry as Client, RegistryOptions};
use qemu_tests::registry::{assert_cache_sound, Fault, FaultProxy, Pusher, Registry};

fn opts(plain: &str) -> RegistryOptions {
    RegistryOptions { plain_http: vec![plain.to_string()], ca_files: vec![], parallel: 8 }
}

fn pinned(refs: &[&str], digests: &[String]) -> Vec<(String, String)> {
    refs.iter().map(|r| r.to_string()).zip(digests.iter().cloned()).collect()
}

fn no_locks(refs: &[&str]) -> Vec<(String, Option<String>)> {
    refs.iter().map(|r| (r.to_string(), None)).collect()
}

/// A registry holding `t/hello:1` (amd64), `t/multi:1` (an amd64 + arm64 index) and
/// `t/armonly:1` (an index with arm64 only). Returns (registry, amd64 digest of multi).
fn stocked() -> Result<(Registry, String, String)> {
    let reg = Registry::start()?;
    let p = Pusher::new(&format!("http://{}", reg.addr));
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let (hello, _, _) =
        p.image("t/hello", "1", "amd64", &[("hello", b"hello\n", 0o755), ("data", &big, 0o644)], &["/hello"])?;
    let (a, asz, _) = p.image("t/multi", "amd64", "amd64", &[("x", b"amd64", 0o644)], &["/x"])?;
    let (b, bsz, _) = p.image("t/multi", "arm64", "arm64", &[("x", b"arm64", 0o644)], &["/x"])?;
    p.index("t/multi", "1", &[(a.clone(), asz, "amd64"), (b.clone(), bsz, "arm64")])?;
    let (c, csz, _) = p.image("t/armonly", "arm64", "arm64", &[("x", b"arm", 0o644)], &["/x"])?;
    p.index("t/armonly", "1", &[(c, csz, "arm64")])?;
    Ok((reg, hello, a))
}

#[test]
fn tags_indexes_and_digests_resolve_and_a_warm_cache_needs_no_network() -> Result<()> {
    let (reg, hello, multi_amd64) = stocked()?;
    let cache = tempfile::tempdir()?;
    let a = &reg.addr.clone();
    let by_digest = format!("{a}/t/hello@{hello}");
    let refs = [format!("{a}/t/hello:1"), format!("{a}/t/multi:1"), by_digest.clone()];
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();

    let client = Client::new(&opts(a), cache.path())?;
    let digests = client.resolve_all(&no_locks(&refs))?;
    assert_eq!(
        digests,
        vec![hello.clone(), multi_amd64.clone(), hello.clone()],
        "tags pinned; the index resolved to its linux/amd64 manifest"
    );
    let pulled = client.fetch_all(&pinned(&refs, &digests))?;
    assert!(pulled[0].size_bytes > 3 << 20, "{:?}", pulled[0]);
    assert_eq!(pulled[0].name, format!("{a}/t/hello:1"));
    assert_eq!(pulled[2].name, format!("{a}/t/hello@{hello}"));
    assert!(client.transfer.bytes.load(Ordering::Relaxed) > 3 << 20);
    assert_eq!(assert_cache_sound(cache.path())?, 6, "manifest, config and layer of hello and of multi's amd64 image");

    // Everything cached and pinned (as the lock file pins it): no network at all.
    drop(reg);
    let again = Client::new(&opts(a), cache.path())?;
    let locked: Vec<(String, Option<String>)> =
        refs.iter().map(|r| r.to_string()).zip(digests.iter().cloned().map(Some)).collect();
    let d2 = again.resolve_all(&locked)?;
    let p2 = again.fetch_all(&pinned(&refs, &d2))?;
    assert_eq!(p2, pulled);
    assert_eq!(again.transfer.bytes.load(Ordering::Relaxed), 0, "a warm cache transfers 0 bytes");
    Ok(())
}

#[test]
fn misbehaving_registries_give_clear_errors_and_never_a_corrupt_cache() -> Result<()> {
    let (reg, _, _) = stocked()?;
    let proxy = FaultProxy::start(&reg.addr, Fault::None)?;
    let hello = format!("{}/t/hello:1", proxy.addr);
    let refs = [hello.as_str()];
    let cache = tempfile::tempdir()?;
    let client = || Client::new(&opts(&proxy.addr), cache.path());
    let resolve = |c: &Client| c.resolve_all(&no_locks(&refs));
    let digests = resolve(&client()?)?;

    // Altered bytes: refused, named, not cached; fine once the registry behaves.
    proxy.set(Fault::AlterBlobs);
    let e = format!("{:#}", client()?.fetch_all(&pinned(&refs, &digests)).unwrap_err());
    assert!(
        e.contains(&hello) && e.contains("different bytes") && (e.contains("layer 1/1") || e.contains("config")),
        "{e}"
    );
    assert_cache_sound(cache.path())?;
    proxy.set(Fault::None);
    client()?.fetch_all(&pinned(&refs, &digests))?;
    let n = assert_cache_sound(cache.path())?;
    assert_eq!(n, 3);

    // The other failures need an empty cache again.
    let fresh = |c: &tempfile::TempDir| Client::new(&opts(&proxy.addr), c.path());

    // Truncated blobs: retried, then a clear error; nothing partial kept.
    let c2 = tempfile::tempdir()?;
    proxy.set(Fault::TruncateBlobs);
    let e = format!("{:#}", fresh(&c2)?.fetch_all(&pinned(&refs, &digests)).unwrap_err());
    assert!(e.contains(&hello) && e.contains("ended after") && e.contains("attempts"), "{e}");
    assert_cache_sound(c2.path())?;

    // 500 twice, then 200: retried with backoff, succeeds.
    proxy.set(Fault::FailBlobs(2));
    proxy.blob_requests.store(0, Ordering::SeqCst);
    fresh(&c2)?.fetch_all(&pinned(&refs, &digests))?;
    assert!(proxy.blob_requests.load(Ordering::SeqCst) >= 4, "the failed requests were retried");
    assert_eq!(assert_cache_sound(c2.path())?, 3);

    // 404.
    proxy.set(Fault::None);
    let missing = format!("{}/t/nosuch:1", proxy.addr);
    let e = format!("{:#}", fresh(&c2)?.resolve_all(&no_locks(&[missing.as_str()])).unwrap_err());
    assert!(e.contains(&missing) && e.contains("no such image"), "{e}");

    // Only arm64 offered.
    let arm = format!("{}/t/armonly:1", proxy.addr);
    let e = format!("{:#}", fresh(&c2)?.resolve_all(&no_locks(&[arm.as_str()])).unwrap_err());
    assert!(e.contains(&arm) && e.contains("no linux/amd64") && e.contains("linux/arm64"), "{e}");
    Ok(())
}

#[test]
fn bearer_token_registry_needs_credentials_from_docker_config() -> Result<()> {
    let (reg, _, _) = stocked()?;
    let proxy = FaultProxy::start(&reg.addr, Fault::RequireToken { user: "lab".into(), password: "s3cret".into() })?;
    let hello = format!("{}/t/hello:1", proxy.addr);
    let cache = tempfile::tempdir()?;
    let home = tempfile::tempdir()?;
    // This test binary's other tests use anonymous registries only; DOCKER_CONFIG is ours.
    std::env::set_var("DOCKER_CONFIG", home.path());
    let e = format!(
        "{:#}",
        Client::new(&opts(&proxy.addr), cache.path())?.resolve_all(&no_locks(&[hello.as_str()])).unwrap_err()
    );
    assert!(e.contains(&hello) && e.contains("refused access") && e.contains("docker login"), "{e}");

    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("lab:s3cret");
    fs::write(home.path().join("config.json"), format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, proxy.addr))?;
    let c = Client::new(&opts(&proxy.addr), cache.path())?;
    let d = c.resolve_all(&no_locks(&[hello.as_str()]))?;
    c.fetch_all(&pinned(&[hello.as_str()], &d))?;
    assert_eq!(assert_cache_sound(cache.path())?, 3);

    // Manifest cached, a layer not (an earlier run broke off): the blob request needs a token
    // although no manifest request fetched one.
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(cache.path().join("blobs/sha256").join(&d[0]["sha256:".len()..]))?)?;
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    fs::remove_file(cache.path().join("blobs/sha256").join(&layer["sha256:".len()..]))?;
    let c = Client::new(&opts(&proxy.addr), cache.path())?;
    let d2 = c.resolve_all(&[(hello.clone(), Some(d[0].clone()))])?;
    c.fetch_all(&pinned(&[hello.as_str()], &d2))?;
    assert_eq!(assert_cache_sound(cache.path())?, 3);
    std::env::remove_var("DOCKER_CONFIG");
    Ok(())
}

#[test]
fn tls_registry_with_a_private_ca_is_trusted_only_with_ca_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A private CA and a server certificate it signed (webpki refuses a CA as end entity).
    let (ca, ca_key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let (cert, key, csr) = (dir.path().join("cert.pem"), dir.path().join("key.pem"), dir.path().join("req.csr"));
    let ext = dir.path().join("ext.cnf");
    fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509", "-days", "2", "-subj", "/CN=labforge test CA"][..],
            &ec,
            &["-keyout", p(&ca_key), "-out", p(&ca)],
        ]
        .concat(),
    )?;
    openssl(&[&["req", "-subj", "/CN=127.0.0.1"][..], &ec, &["-keyout", p(&key), "-out", p(&csr)]].concat())?;
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        p(&csr),
        "-CA",
        p(&ca),
        "-CAkey",
        p(&ca_key),
        "-CAcreateserial",
        "-extfile",
        p(&ext),
        "-out",
        p(&cert),
    ])?;
    let port = qemu_tests::registry::free_port()?;
    let reg = Registry::start_with(port, Some((&cert, &key)))?;
    // Stocked over TLS with curl, which is told to trust the test CA.
    let hello_tar = qemu_tests::registry::tar_layer(&[("hello", b"tls\n", 0o644)])?;
    let layer_digest = qemu_tests::registry::digest(&hello_tar);
    let config = serde_json::to_vec(
        &serde_json::json!({"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[layer_digest]}}),
    )?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": qemu_tests::registry::OCI_MANIFEST,
        "config": {"mediaType": qemu_tests::registry::OCI_CONFIG, "digest": qemu_tests::registry::digest(&config), "size": config.len()},
        "layers": [{"mediaType": qemu_tests::registry::OCI_LAYER, "digest": layer_digest, "size": hello_tar.len()}],
    }))?;
    let base = format!("https://{}", reg.addr);
    for (data, name) in [(&hello_tar, "layer"), (&config, "config")] {
        let f = dir.path().join(name);
        fs::write(&f, data)?;
        let d = qemu_tests::registry::digest(data);
        let loc = curl(
            &ca,
            &["-sS", "-D", "-", "-o", "/dev/null", "-X", "POST", &format!("{base}/v2/t/tls/blobs/uploads/")],
        )?;
        let loc = loc
            .lines()
            .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
            .expect("Location")
            .trim()
            .to_string();
        let loc = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
        let sep = if loc.contains('?') { '&' } else { '?' };
        curl(
            &ca,
            &[
                "-sSf",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &format!("@{}", f.display()),
                &format!("{loc}{sep}digest={d}"),
            ],
        )?;
    }
    let mf = dir.path().join("manifest");
    fs::write(&mf, &manifest)?;
    curl(
        &ca,
        &[
            "-sSf",
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {}", qemu_tests::registry::OCI_MANIFEST),
            "--data-binary",
            &format!("@{}", mf.display()),
            &format!("{base}/v2/t/tls/manifests/1"),
        ],
    )?;

    let r = format!("{}/t/tls:1", reg.addr);
    let cache = tempfile::tempdir()?;
    let untrusted = RegistryOptions { plain_http: vec![], ca_files: vec![], parallel: 2 };
    let e = format!("{:#}", Client::new(&untrusted, cache.path())?.resolve_all(&no_locks(&[r.as_str()])).unwrap_err());
    assert!(e.contains(&r) && e.contains("--ca-file"), "{e}");
    let trusted = RegistryOptions { plain_http: vec![], ca_files: vec![ca.clone()], parallel: 2 };
    let c = Client::new(&trusted, cache.path())?;
    let d = c.resolve_all(&no_locks(&[r.as_str()]))?;
    assert_eq!(d[0], qemu_tests::registry::digest(&manifest));
    c.fetch_all(&pinned(&[r.as_str()], &d))?;
    assert_eq!(assert_cache_sound(cache.path())?, 3);
    Ok(())
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).output()?;
    anyhow::ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn curl(ca: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("curl").arg("--cacert").arg(ca).args(args).output()?;
    anyhow::ensure!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A full disk while blobs stream into the cache: a clear error naming the image, no partial
/// file, and a later run (with room) succeeds.
#[test]
fn disk_full_while_caching_leaves_no_partial_blob() -> Result<()> {
    let (reg, _, _) = stocked()?;
    let hello = format!("{}/t/hello:1", reg.addr);
    let cache = tempfile::tempdir()?;
    let mnt =
        nix::mount::mount(Some("tmpfs"), cache.path(), Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m"));
    mnt.map_err(|e| anyhow::anyhow!("mounting a 1 MiB tmpfs (tests run as root): {e}"))?;
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _u = Unmount(cache.path());
    let c = Client::new(&opts(&reg.addr), cache.path())?;
    let d = c.resolve_all(&no_locks(&[hello.as_str()]))?;
    let e = format!("{:#}", c.fetch_all(&pinned(&[hello.as_str()], &d)).unwrap_err());
    assert!(e.contains(&hello) && e.contains("layer") && e.contains("No space left"), "{e}");
    assert!(!e.contains("attempts"), "a full disk is not retried: {e}");
    assert_cache_sound(cache.path())?;
    drop(_u);
    // With room: the same cache dir (now on the real disk) succeeds.
    let c = Client::new(&opts(&reg.addr), cache.path())?;
    c.fetch_all(&pinned(&[hello.as_str()], &c.resolve_all(&no_locks(&[hello.as_str()]))?))?;
    assert_eq!(assert_cache_sound(cache.path())?, 3);
    Ok(())
}

/// Through the binary: a preload entry that cannot be resolved fails the build before any
/// package is installed, names the entry, writes nothing to --out and no lock file.
#[test]
fn unresolvable_preload_fails_the_build_naming_the_entry() -> Result<()> {
    let reg = Registry::start()?;
    let ws = qemu_tests::workspace_root();
    let dir = tempfile::tempdir()?;
    let missing = format!("{}/t/absent:2", reg.addr);
    let spec = dir.path().join("spec.toml");
    fs::write(
        &spec,
        format!(
            "extends = \"{}\"\nname = \"airgap\"\n\n[[preload]]\nref = \"{missing}\"\n",
            ws.join("images/demo.toml").display()
        ),
    )?;
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    let res = Command::new(ws.join("target/release/labforge"))
        .args(["build", "--plain-http", &reg.addr, "--cache-dir"])
        .arg(&cache)
        .arg("--out")
        .arg(&out)
        .arg("--agent")
        .arg(ws.join("target/release/labforge-agent"))
        .arg(&spec)
        .output()?;
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(err.contains(&missing) && err.contains("no such image"), "{err}");
    assert!(fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) == 0, "nothing in --out");
    assert!(!dir.path().join("airgap.lock.toml").exists(), "no lock file for a failed build");
    assert!(
        !cache.join("rootfs").exists() || fs::read_dir(cache.join("rootfs"))?.count() == 0,
        "failed before the rootfs stage"
    );
    Ok(())
}
