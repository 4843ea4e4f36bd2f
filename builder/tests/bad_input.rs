//! Bad input gets one clear message, a non-zero exit, no partial artifact and no temp files.
//! These run the real `labforge` binary the way a user would.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Any executable file works as the agent for builds that fail before it is installed.
fn fake_agent_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_labforge"))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("LABFORGE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/labforge"))
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        p
    }
    fn out(&self) -> PathBuf {
        self.path("out")
    }
    fn build(&self, spec: &Path, extra: &[&str]) -> Output {
        self.command(spec, extra).output().unwrap()
    }
    fn command(&self, spec: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_labforge"));
        c.arg("build")
            .arg(spec)
            .arg("--out")
            .arg(self.out())
            .arg("--cache-dir")
            .arg(self.path("cache"))
            .arg("--agent")
            .arg(fake_agent_path())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        c
    }
    /// Nothing was left in the output directory or the cache's temp area.
    fn assert_nothing_left(&self) {
        assert_clean(&self.out(), &self.path("cache"));
    }
}

fn assert_clean(out: &Path, cache: &Path) {
    let leftovers = |d: &Path| -> Vec<String> {
        fs::read_dir(d)
            .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    assert_eq!(leftovers(out), Vec::<String>::new(), "output directory must stay empty");
    assert_eq!(leftovers(&cache.join("tmp")), Vec::<String>::new(), "temporary build dirs must be removed");
    let partial: Vec<String> =
        leftovers(&cache.join("rootfs")).into_iter().filter(|n| n.starts_with(".partial")).collect();
    assert!(partial.is_empty(), "no partial cache entries: {partial:?}");
}

/// Exactly one error line that names what went wrong.
fn assert_error(out: &Output, needles: &[&str]) -> String {
    assert!(!out.status.success(), "must fail");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("labforge: error:")).collect();
    assert_eq!(errors.len(), 1, "one error message:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "error should mention {n:?}:\n{stderr}");
    }
    assert!(out.stdout.is_empty(), "stdout stays clean for machine-readable output");
    stderr
}

const OK_SPEC: &str = "name = \"t\"\n[base]\nsuite = \"bookworm\"\n";

#[test]
fn malformed_toml_names_file_and_line() {
    let c = Case::new();
    let spec = c.write("spec.toml", "name = \"t\"\n[base\nsuite = \"bookworm\"\n");
    let out = c.build(&spec, &[]);
    assert_error(&out, &[&format!("{}:2:", spec.display())]);
    c.assert_nothing_left();
}

#[test]
fn unknown_key_names_the_field() {
    let c = Case::new();
    let spec = c.write("spec.toml", "name = \"t\"\n[disk]\nroot-sise = \"2GiB\"\n[base]\nsuite = \"bookworm\"\n");
    let out = c.build(&spec, &[]);
    assert_error(&out, &[&format!("{}:3:1: disk.root-sise", spec.display()), "unknown field"]);
    c.assert_nothing_left();
}

#[test]
fn missing_overlay_dir_is_named() {
    let c = Case::new();
    let spec = c.write("spec.toml", &format!("overlays = [\"nope\"]\n{OK_SPEC}"));
    let out = c.build(&spec, &[]);
    assert_error(&out, &["overlays[0]", "nope", "does not exist"]);
    c.assert_nothing_left();
}

#[test]
fn template_with_unknown_variable_fails_before_any_download() {
    let c = Case::new();
    c.write("ov/etc/motd.j2", "welcome to {{ spec.name }}\n{{ spec.colour }}\n");
    let spec = c.write("spec.toml", &format!("overlays = [\"ov\"]\n{OK_SPEC}"));
    let out = c.build(&spec, &[]);
    assert_error(&out, &["motd.j2:2", "undefined"]);
    assert!(!c.path("cache/rootfs").exists(), "no rootfs work was started");
    c.assert_nothing_left();
}

#[test]
fn missing_host_tool_says_which_package() {
    let c = Case::new();
    let spec = c.write("spec.toml", OK_SPEC);
    let empty = c.path("empty-path");
    fs::create_dir_all(&empty).unwrap();
    let out = c.command(&spec, &[]).env("PATH", &empty).output().unwrap();
    assert_error(&out, &["missing host tools", "mmdebstrap", "apt-get install"]);
    c.assert_nothing_left();
}

#[test]
fn unreachable_mirror_is_reported_and_nothing_is_cached() {
    let c = Case::new();
    // A port on loopback with nothing listening: connections are refused at once.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec = c.write("spec.toml", OK_SPEC);
    let mirror = format!("http://127.0.0.1:{port}/debian");
    let out = c.build(&spec, &["--mirror", &mirror]);
    assert_error(&out, &[&mirror, "could not be reached", "--mirror"]);
    c.assert_nothing_left();
    let cached: Vec<_> = fs::read_dir(c.path("cache/rootfs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "tar"))
        .collect();
    assert!(cached.is_empty(), "a failed rootfs is never cached");
}

#[test]
fn out_dir_not_writable_fails_before_work_starts() {
    let c = Case::new();
    let spec = c.write("spec.toml", OK_SPEC);
    // As root, permissions do not stop writes; the immutable attribute does.
    fs::create_dir_all(c.out()).unwrap();
    let status = Command::new("chattr").arg("+i").arg(c.out()).status().unwrap();
    assert!(status.success(), "chattr +i (e2fsprogs) must work on the test filesystem");
    struct Unlock(PathBuf);
    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let _unlock = Unlock(c.out());
    let out = c.build(&spec, &[]);
    assert_error(&out, &[&format!("output directory {} is not writable", c.out().display())]);
    assert!(!c.path("cache/rootfs").exists(), "no rootfs work was started");
}

#[test]
fn root_too_small_for_the_packages_is_refused() {
    // Uses the demo rootfs from the shared cache (built once per input hash).
    let c = Case::new();
    let demo = workspace().join("images/demo.toml");
    let spec = c.write(
        "small.toml",
        &format!("extends = \"{}\"\nname = \"small\"\n[disk]\nroot-size = \"512MiB\"\n", demo.display()),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_labforge"))
        .arg("build")
        .arg(&spec)
        .arg("--out")
        .arg(c.out())
        .arg("--cache-dir")
        .arg(cache_dir())
        .arg("--agent")
        .arg(fake_agent_path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_error(&out, &["disk.root-size (512 MiB) is too small", "raise disk.root-size"]);
    let left: Vec<_> = fs::read_dir(c.out()).unwrap().collect();
    assert!(left.is_empty(), "no partial artifact");
}

#[test]
fn interrupt_mid_build_removes_everything() {
    let c = Case::new();
    // A mirror that accepts connections and never answers: mmdebstrap hangs in `apt update`.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mirror = format!("http://{}/debian", listener.local_addr().unwrap());
    let spec = c.write("spec.toml", OK_SPEC);
    let child = c.command(&spec, &["--mirror", &mirror]).stderr(Stdio::piped()).spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);

    // Wait (with a deadline) until the build is really inside mmdebstrap: apt connects.
    let (connected, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            let _ = connected.send(());
            // Keep the connection open and silent until the peer goes away.
            let _ = drain(s);
        }
    });
    rx.recv_timeout(Duration::from_secs(120)).expect("mmdebstrap contacted the mirror");
    assert!(c.path("cache/tmp").read_dir().unwrap().next().is_some(), "a build dir exists mid-build");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let out = exited.recv_timeout(Duration::from_secs(60)).expect("labforge stops within 60s of ^C").unwrap();
    let (status, stderr) = (out.status, String::from_utf8_lossy(&out.stderr).into_owned());
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    c.assert_nothing_left();
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&c.path("cache").display().to_string()), "no mount left behind");
}

fn drain(mut s: std::net::TcpStream) -> std::io::Result<()> {
    let mut b = [0u8; 1024];
    while s.read(&mut b)? > 0 {}
    Ok(())
}

const K8S_SPEC: &str = "name = \"t\"\n[base]\nsuite = \"bookworm\"\n[kubernetes]\nenabled = true\n";

#[test]
fn stack_image_not_preloaded_fails_naming_component_object_and_field() {
    let c = Case::new();
    c.write("wiki/component.toml", "name = \"wiki\"\nnamespace = \"wiki\"\n[images]\nweb = \"registry.lab/wiki:1\"\n");
    c.write(
        "wiki/app.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: wiki\nspec:\n  template:\n    spec:\n      containers:\n        - name: web\n          image: {{ images.web }}\n        - name: sidecar\n          image: registry.lab/sidecar:2\n",
    );
    let spec = c.write("spec.toml", &format!("{K8S_SPEC}[stack]\ncomponents = [\"wiki\"]\nsite = [\"wiki\"]\n"));
    let out = c.build(&spec, &[]);
    assert_error(
        &out,
        &[
            "component wiki",
            "Deployment wiki",
            "spec.template.spec.containers[1].image",
            "registry.lab/sidecar:2",
            "does not preload",
        ],
    );
    assert!(!c.path("cache/rootfs").exists(), "refused before any download");
    assert!(!c.path("t.lock.toml").exists(), "no lock file written");
    c.assert_nothing_left();
}

#[test]
fn stack_cycles_and_unknown_components_are_refused_at_plan_time() {
    let c = Case::new();
    for (name, dep) in [("a", "b"), ("b", "a")] {
        c.write(
            &format!("{name}/component.toml"),
            &format!("name = \"{name}\"\nnamespace = \"{name}\"\ndepends-on = [\"{dep}\"]\n"),
        );
        c.write(&format!("{name}/x.yaml"), &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"));
    }
    let spec =
        c.write("spec.toml", &format!("{K8S_SPEC}[stack]\ncomponents = [\"a\", \"b\"]\nsite = [\"a\", \"b\"]\n"));
    let out =
        Command::new(env!("CARGO_BIN_EXE_labforge")).arg("plan").arg(&spec).env("RUST_LOG", "warn").output().unwrap();
    assert_error(&out, &["circle", "a → b → a"]);
    let spec = c.write("spec2.toml", &format!("{K8S_SPEC}[stack]\ncomponents = [\"storge\"]\n"));
    let out =
        Command::new(env!("CARGO_BIN_EXE_labforge")).arg("plan").arg(&spec).env("RUST_LOG", "warn").output().unwrap();
    assert_error(&out, &["no component \"storge\"", "storage"]);
    let spec = c.write("spec3.toml", &format!("{OK_SPEC}[stack]\ncomponents = [\"storage\"]\n"));
    let out =
        Command::new(env!("CARGO_BIN_EXE_labforge")).arg("plan").arg(&spec).env("RUST_LOG", "warn").output().unwrap();
    assert_error(&out, &["[stack] components need Kubernetes", "[kubernetes] enabled = true"]);
}

#[test]
fn plan_never_touches_the_network_and_shows_the_stack() {
    // images/lab.toml preloads tags from registries this machine cannot reach, without a lock.
    let out = Command::new(env!("CARGO_BIN_EXE_labforge"))
        .arg("plan")
        .arg(workspace().join("images/lab.toml"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("retry") && !stderr.contains("WARN"), "no network retries: {stderr}");
    assert!(stdout.contains("preload    registry.k8s.io/kube-apiserver:v1.36.5 (unresolved"), "{stdout}");
    assert!(stdout.contains("stack  1   storage (namespace labforge-storage, built-in)"), "{stdout}");
    assert!(stdout.contains("image provisioner docker.io/rancher/local-path-provisioner:v0.0.30"), "{stdout}");
    // Rook's release files: named with their pins, never downloaded by a plan (cached or not,
    // as this machine's cache has them).
    assert!(stdout.contains("stack  3   rook-ceph (namespace rook-ceph, built-in)"), "{stdout}");
    let crds = "upstream crds https://raw.githubusercontent.com/rook/rook/v1.18.8/deploy/examples/crds.yaml sha256:a0f521004e9a (";
    let line = stdout.lines().find(|l| l.contains(crds)).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.ends_with("(cached)") || line.ends_with("(not cached: the build downloads it)"), "{line}");
}

#[test]
fn a_roster_that_would_run_a_kernel_as_root_or_share_a_uid_is_refused_before_any_work() {
    let c = Case::new();
    let project = "[[lab.projects]]\nname = \"p1\"\ncpu-min = \"0.5\"\ncpu-max = \"1\"\nmemory-min = \"256Mi\"\nmemory-max = \"512Mi\"\n";
    let user = |name: &str, uid: u32| format!("[[lab.users]]\nname = \"{name}\"\nuid = {uid}\nprojects = [\"p1\"]\n");
    let spec = c.write("root.toml", &format!("{K8S_SPEC}{project}{}", user("alice", 0)));
    let out = c.build(&spec, &[]);
    assert_error(&out, &["lab", "\"alice\"", "uid 0 is root's", "1000 or more"]);
    c.assert_nothing_left();
    let spec = c.write("shared.toml", &format!("{K8S_SPEC}{project}{}{}", user("alice", 2001), user("bob", 2001)));
    let out = c.build(&spec, &[]);
    assert_error(&out, &["\"bob\"", "uid 2001 is alice's too"]);
    c.assert_nothing_left();
    let spec = c.write(
        "limits.toml",
        &format!("{K8S_SPEC}{}{}", project.replace("cpu-min = \"0.5\"", "cpu-min = \"4\""), user("alice", 2001)),
    );
    let out = c.build(&spec, &[]);
    assert_error(&out, &["\"p1\"", "cpu-min 4 is above cpu-max 1"]);
    c.assert_nothing_left();
}

#[test]
fn a_lan_that_could_take_public_addresses_or_clash_with_the_pods_is_refused_before_any_work() {
    let c = Case::new();
    for (name, network, says) in [
        ("public.toml", "lan-cidr = \"8.8.8.0/24\"", &["[network]", "not a private network"][..]),
        ("pods.toml", "lan-cidr = \"10.244.7.0/24\"", &["lan-cidr 10.244.7.0/24 overlaps [cluster] pod-cidr"][..]),
        ("tiny.toml", "lan-cidr = \"10.83.0.0/30\"", &["/16 to /28"][..]),
        ("hostbits.toml", "lan-cidr = \"10.83.0.1/24\"", &["host bits set", "10.83.0.0/24"][..]),
        ("uplink.toml", "uplink = \"eth0; rm -rf /\"", &["[network] uplink", "auto, none or an interface name"][..]),
    ] {
        let spec = c.write(name, &format!("{K8S_SPEC}[network]\n{network}\n"));
        let out = c.build(&spec, &[]);
        assert_error(&out, says);
        c.assert_nothing_left();
    }
}
