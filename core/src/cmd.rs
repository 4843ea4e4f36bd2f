//! The one way the agent runs a program: argv built from typed pieces (never a shell line),
//! logged at debug with secrets redacted, a timeout, and the tail of stderr in the error.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use wait_timeout::ChildExt;

/// How many trailing stderr lines go into an error.
const STDERR_TAIL: usize = 15;
/// What a redacted secret reads as.
pub const REDACTED: &str = "<redacted>";

#[derive(Debug, Clone)]
pub struct Cmd {
    program: String,
    args: Vec<OsString>,
    secrets: Vec<String>,
    timeout: Option<Duration>,
    stdin: Option<Vec<u8>>,
}

/// What a finished program left behind, whatever its exit status.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Self {
        Cmd { program: program.into(), args: Vec::new(), secrets: Vec::new(), timeout: None, stdin: None }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// A value never to show in logs or errors (a bootstrap token): replaced by `<redacted>`
    /// wherever it appears in the argv or the program's stderr.
    pub fn secret(mut self, s: impl Into<String>) -> Self {
        let s = s.into();
        if !s.is_empty() {
            self.secrets.push(s);
        }
        self
    }

    /// Kills the program when it runs longer than this.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Feeds these bytes to the program's standard input (otherwise stdin is empty).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// `text` with every secret replaced.
    pub fn redact(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_string(), |t, s| t.replace(s.as_str(), REDACTED))
    }

    /// The command line as a user would type it, secrets redacted.
    pub fn display(&self) -> String {
        let line = std::iter::once(self.program.clone())
            .chain(self.args.iter().map(|a| {
                let s = a.to_string_lossy();
                if s.contains(' ') || s.is_empty() {
                    format!("'{s}'")
                } else {
                    s.into_owned()
                }
            }))
            .collect::<Vec<_>>()
            .join(" ");
        self.redact(&line)
    }

    /// Runs to completion; stdout on success, an error naming the command, its exit status and
    /// the tail of its stderr otherwise.
    pub fn run(&self) -> Result<String> {
        let done = self.finish()?;
        if !done.status.success() {
            let lines: Vec<&str> = done.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(STDERR_TAIL)..].join("\n");
            let sep = if tail.is_empty() { "" } else { ":\n" };
            return Err(anyhow!("`{}` failed ({}){sep}{}", self.display(), done.status, self.redact(&tail)));
        }
        Ok(done.stdout)
    }

    /// Runs to completion and returns what it printed and how it exited, success or not (for
    /// programs whose exit status is an answer, like `systemctl is-system-running`).
    pub fn finish(&self) -> Result<Finished> {
        tracing::debug!(cmd = %self.display(), "running");
        let mut child = self.command(Stdio::piped(), Stdio::piped()).spawn().map_err(|e| self.spawn_error(e))?;
        if let Some(bytes) = &self.stdin {
            let mut pipe = child.stdin.take().expect("piped");
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let out = reader(child.stdout.take().expect("piped"));
        let err = reader(child.stderr.take().expect("piped"));
        let status = match self.timeout {
            None => child.wait().with_context(|| format!("waiting for {}", self.program))?,
            Some(limit) => match child.wait_timeout(limit).with_context(|| format!("waiting for {}", self.program))? {
                Some(st) => st,
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(anyhow!(
                        "`{}` did not finish within {} s; stopped it",
                        self.display(),
                        limit.as_secs()
                    ));
                }
            },
        };
        let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        Ok(Finished { status, stdout, stderr })
    }

    /// Starts a long-running program (a server the agent supervises); its output goes where
    /// the agent's goes (the journal).
    pub fn spawn(&self) -> Result<Child> {
        tracing::debug!(cmd = %self.display(), "starting");
        self.command(Stdio::inherit(), Stdio::inherit()).spawn().map_err(|e| self.spawn_error(e))
    }

    /// The program as a `std::process::Command`, for the one case this runner does not cover:
    /// a program fed a stream the caller writes as it goes (`ctr images import` reading an
    /// archive). The argv is logged here like every other.
    pub fn streaming(&self) -> Command {
        tracing::debug!(cmd = %self.display(), "running");
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c
    }

    fn command(&self, stdout: Stdio, stderr: Stdio) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args).stdout(stdout).stderr(stderr);
        c.stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        c
    }

    fn spawn_error(&self, e: std::io::Error) -> anyhow::Error {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{} is not installed on this node", self.program)
        } else {
            anyhow!("starting {}: {e}", self.program)
        }
    }
}

/// Waits (up to a minute) for udev to finish handling the events a disk change caused. A
/// failure only means the next step may see a stale view, which it re-checks anyway.
pub fn udev_settle() {
    if let Err(e) = Cmd::new("udevadm").args(["settle", "--timeout=60"]).timeout(Duration::from_secs(90)).run() {
        tracing::debug!("udevadm settle: {e:#}");
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_stderr_tail_and_argv() {
        let err = Cmd::new("sh").arg("-c").arg("echo first >&2; echo last words >&2; exit 3").run().unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("last words"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("`sh -c"), "{msg}");
    }

    #[test]
    fn secrets_are_redacted_from_argv_and_stderr() {
        let token = "abcdef.0123456789abcdef";
        let cmd = Cmd::new("sh").arg("-c").arg(format!("echo bad token {token} >&2; exit 1")).secret(token);
        assert!(!cmd.display().contains(token));
        let msg = format!("{:#}", cmd.run().unwrap_err());
        assert!(!msg.contains(token), "{msg}");
        assert!(msg.contains("bad token <redacted>"), "{msg}");
    }

    #[test]
    fn a_program_past_its_timeout_is_stopped() {
        let t = std::time::Instant::now();
        let err = Cmd::new("sleep").arg("30").timeout(Duration::from_millis(200)).run().unwrap_err();
        assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn stdin_and_stdout() {
        assert_eq!(Cmd::new("cat").stdin("hello").run().unwrap(), "hello");
        let done = Cmd::new("sh").arg("-c").arg("echo out; exit 4").finish().unwrap();
        assert_eq!((done.status.code(), done.stdout.as_str()), (Some(4), "out\n"));
    }

    #[test]
    fn missing_program_is_named() {
        let err = Cmd::new("no-such-program-here").run().unwrap_err();
        assert!(format!("{err:#}").contains("no-such-program-here is not installed"), "{err:#}");
    }
}
