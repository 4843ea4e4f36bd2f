//! A real Kubernetes control plane on loopback, without VMs: etcd, kube-apiserver and
//! kube-controller-manager from the upstream fixture (built from their Go modules), listening
//! on 127.0.0.1 only. No kubelet: pods are admitted (or refused) by the real admission chain —
//! LimitRanger, ResourceQuota, PodSecurity, strict field validation — and then stay Pending.
//! This is what proves, inside `make test`, what the API server itself enforces; what needs
//! nodes (scheduling, containers, volumes) is proven in the VM room (`make test-kubernetes`).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The control plane; stopped (and its data removed) when dropped.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port on 127.0.0.1 nothing listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl ControlPlane {
    /// Starts etcd, the API server and the controller manager from `fixture` (see
    /// [`crate::kubernetes::fixture`]) and waits until the API server is ready and the
    /// controllers have made the `default` namespace's service account.
    pub fn start(fixture: &Path) -> Result<ControlPlane> {
        let dir = tempfile::Builder::new().prefix("labforge-apiserver-").tempdir()?;
        let d = dir.path().to_path_buf();
        let bin = |n: &str| fixture.join("bin").join(n);
        let log = |cmd: &mut Command, n: &str| -> Result<()> { logged(cmd, &d.join(format!("{n}.log"))) };
        // The service-account signing key and an admin token (static token file: loopback only,
        // and only for this test's lifetime).
        let sa_key = d.join("sa.key");
        run(Command::new("openssl").args(["genrsa", "-out"]).arg(&sa_key).arg("2048"))?;
        let token = hex::encode(rand_bytes()?);
        let tokens = d.join("tokens.csv");
        fs::write(&tokens, format!("{token},admin,admin,system:masters\n"))?;

        let mut cp = ControlPlane {
            kubectl: bin("kubectl"),
            kubeconfig: d.join("admin.conf"),
            url: String::new(),
            children: Vec::new(),
            dir,
        };
        let (client, peer) = (free_port()?, free_port()?);
        let etcd = Command::new(bin("etcd"))
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg("--name=default")
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .arg("--unsafe-no-fsync")
            .tap(|c| log(c, "etcd"))?
            .spawn()
            .context("starting etcd")?;
        cp.children.push(("etcd".into(), etcd));

        let port = free_port()?;
        cp.url = format!("https://127.0.0.1:{port}");
        let apiserver = Command::new(bin("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-key-file={}", sa_key.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--service-cluster-ip-range=10.96.0.0/12")
            .arg("--allow-privileged=true")
            .tap(|c| log(c, "kube-apiserver"))?
            .spawn()
            .context("starting kube-apiserver")?;
        cp.children.push(("kube-apiserver".into(), apiserver));
        cp.write_kubeconfig(&cp.kubeconfig, &token)?;
        crate::poll("the API server to be ready", Duration::from_secs(180), Duration::from_millis(500), || {
            cp.check_alive().map_err(|e| format!("{e:#}"))?;
            match cp.kubectl("get --raw /readyz", "") {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
                Err(e) => Err(format!("{e:#}")),
            }
        })?;

        let kcm = Command::new(bin("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg("--leader-elect=false")
            .arg(format!("--service-account-private-key-file={}", sa_key.display()))
            .arg("--controllers=*")
            .tap(|c| log(c, "kube-controller-manager"))?
            .spawn()
            .context("starting kube-controller-manager")?;
        cp.children.push(("kube-controller-manager".into(), kcm));
        crate::poll(
            "the controllers to make the default service account",
            Duration::from_secs(120),
            Duration::from_millis(500),
            || {
                cp.check_alive().map_err(|e| format!("{e:#}"))?;
                let o =
                    cp.kubectl("-n default get serviceaccount default -o name", "").map_err(|e| format!("{e:#}"))?;
                if o.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&o.stderr).into_owned())
                }
            },
        )?;
        Ok(cp)
    }

    /// Fails naming the process that exited, with the end of its log.
    fn check_alive(&mut self) -> Result<()> {
        for (name, c) in self.children.iter_mut() {
            if let Some(status) = c.try_wait()? {
                let log = fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                bail!("{name} exited ({status}):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        Ok(())
    }

    /// Writes a kubeconfig (mode 0600) for this API server that authenticates with `token`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        write!(
            f,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context: {{cluster: local, user: user}}\ncurrent-context: local\n",
            self.url
        )?;
        Ok(())
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `kubectl <args>` (split on whitespace) with `stdin`.
    pub fn kubectl(&self, args: &str, stdin: &str) -> Result<Output> {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args.split_whitespace())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        child.stdin.take().expect("piped").write_all(stdin.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// `kubectl <args>` that must succeed; its output (stdout and stderr).
    pub fn kubectl_ok(&self, args: &str, stdin: &str) -> Result<String> {
        let o = self.kubectl(args, stdin)?;
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        if !o.status.success() {
            bail!("kubectl {args} failed ({}):\n{text}", o.status);
        }
        Ok(text)
    }

    /// `kubectl <args>` that must fail; its error output.
    pub fn kubectl_refused(&self, args: &str, stdin: &str) -> Result<String> {
        let o = self.kubectl(args, stdin)?;
        if o.status.success() {
            bail!("kubectl {args} was accepted: {}", String::from_utf8_lossy(&o.stdout));
        }
        Ok(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

/// Sends `cmd`'s output to `path`, one file for both streams. (A process is stopped when its
/// owner is dropped; the workspace allows no `unsafe`, so no parent-death signal for a test
/// killed outright.)
pub fn logged(cmd: &mut Command, path: &Path) -> Result<()> {
    let f = fs::File::create(path)?;
    cmd.stdout(f.try_clone()?).stderr(f);
    Ok(())
}

/// `Command` builder steps that can fail, in a chain.
trait Tap {
    fn tap(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<&mut Self>;
}

impl Tap for Command {
    fn tap(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<&mut Self> {
        f(self)?;
        Ok(self)
    }
}

fn rand_bytes() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))?;
    Ok(b)
}
