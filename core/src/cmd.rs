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
        self.check(self.finish()?)
    }

    /// Stdout of a finished program that succeeded; the error `run` describes otherwise.
    fn check(&self, done: Finished) -> Result<String> {
        if !done.status.success() {
            let lines: Vec<&str> = done.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(STDERR_TAIL)..].join("\n");
            let sep = if tail.is_empty() { "" } else { ":\n" };
            return Err(anyhow!("`{}` failed ({}){sep}{}", self.display(), done.status, self.redact(&tail)));
        }
        Ok(done.stdout)
    }

    /// [`Cmd::run`], handing each line of standard output (secrets redacted) to `on_line` as
    /// the program prints it: progress of a long step (kubeadm's phases) while it runs.
    pub fn run_lines(&self, on_line: &mut dyn FnMut(&str)) -> Result<String> {
        let deadline = self.timeout.map(|t| std::time::Instant::now() + t);
        let mut child = self.start_piped()?;
        let err = reader(child.stderr.take().expect("piped"));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            use std::io::BufRead;
            // Lines are bounded by what a program prints; a runaway one is cut at 64 KiB.
            let mut r = std::io::BufReader::new(stdout);
            let mut line = Vec::new();
            while let Ok(n) = (&mut r).take(64 * 1024).read_until(b'\n', &mut line) {
                if n == 0 || tx.send(String::from_utf8_lossy(&line).trim_end().to_string()).is_err() {
                    break;
                }
                line.clear();
            }
        });
        let mut out = String::new();
        let timed_out = |child: &mut Child| {
            let _ = child.kill();
            let _ = child.wait();
            anyhow!(
                "`{}` did not finish within {} s; stopped it",
                self.display(),
                self.timeout.unwrap_or_default().as_secs()
            )
        };
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            let got = match left {
                Some(l) => rx.recv_timeout(l),
                None => rx.recv().map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
            };
            match got {
                Ok(line) => {
                    let line = self.redact(&line);
                    on_line(&line);
                    out.push_str(&line);
                    out.push('\n');
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err(timed_out(&mut child)),
            }
        }
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let status = match left {
            None => child.wait().with_context(|| format!("waiting for {}", self.program))?,
            Some(l) => match child.wait_timeout(l).with_context(|| format!("waiting for {}", self.program))? {
                Some(st) => st,
                None => return Err(timed_out(&mut child)),
            },
        };
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        self.check(Finished { status, stdout: out, stderr })
    }

    /// Runs to completion and returns what it printed and how it exited, success or not (for
    /// programs whose exit status is an answer, like `systemctl is-system-running`).
    pub fn finish(&self) -> Result<Finished> {
        let mut child = self.start_piped()?;
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

    /// Starts the program with stdout and stderr piped, feeding it its stdin (if any) from a
    /// thread: the start `finish` and `run_lines` share.
    fn start_piped(&self) -> Result<Child> {
        tracing::debug!(cmd = %self.display(), "running");
        let mut child = self.command(Stdio::piped(), Stdio::piped()).spawn().map_err(|e| self.spawn_error(e))?;
        if let Some(bytes) = &self.stdin {
            let mut pipe = child.stdin.take().expect("piped");
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        Ok(child)
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
    fn lines_arrive_redacted_as_printed_and_failures_still_carry_stderr() {
        let mut seen = Vec::new();
        let out = Cmd::new("sh")
            .arg("-c")
            .arg("echo '[certs] one'; echo 'token abc.def here'; printf 'no newline'")
            .secret("abc.def")
            .timeout(Duration::from_secs(30))
            .run_lines(&mut |l| seen.push(l.to_string()))
            .unwrap();
        assert_eq!(seen, ["[certs] one", "token <redacted> here", "no newline"]);
        assert_eq!(out, "[certs] one\ntoken <redacted> here\nno newline\n");
        let err = Cmd::new("sh")
            .arg("-c")
            .arg("echo progress; echo 'broke on abc.def' >&2; exit 4")
            .secret("abc.def")
            .run_lines(&mut |_| {})
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("broke on <redacted>") && msg.contains("exit status: 4"), "{msg}");
        let err = Cmd::new("sleep").arg("30").timeout(Duration::from_millis(300)).run_lines(&mut |_| {}).unwrap_err();
        assert!(format!("{err:#}").contains("did not finish within"), "{err:#}");
    }

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
