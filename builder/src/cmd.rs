//! The one way labforge runs external tools: typed argv, logged at debug, stderr tail in errors.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, Context, Result};

use crate::{hostcheck, interrupt};

/// How many trailing stderr lines go into an error.
const STDERR_TAIL: usize = 15;

#[derive(Debug, Clone)]
pub struct Cmd {
    program: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    stdin: Option<PathBuf>,
}

impl Cmd {
    pub fn new(program: &str) -> Self {
        Cmd { program: program.to_string(), args: Vec::new(), env: Vec::new(), stdin: None }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env.push((k.as_ref().to_os_string(), v.as_ref().to_os_string()));
        self
    }

    /// Feeds the file to the tool's standard input (otherwise stdin is empty).
    pub fn stdin_file(mut self, path: &Path) -> Self {
        self.stdin = Some(path.to_path_buf());
        self
    }

    /// The command line as a user would type it, for messages.
    pub fn display(&self) -> String {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().map(|a| {
                let s = a.to_string_lossy();
                if s.contains(' ') {
                    format!("'{s}'")
                } else {
                    s.into_owned()
                }
            }))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs to completion and returns stdout. The tool runs in its own process group so a stop
    /// signal can be forwarded to it and everything it started.
    pub fn run(&self) -> Result<String> {
        interrupt::check()?;
        tracing::debug!(cmd = %self.display(), "running");
        let stdin = match &self.stdin {
            Some(p) => Stdio::from(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?),
            None => Stdio::null(),
        };
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("{} is not installed; {}", self.program, hostcheck::install_hint(&self.program))
            } else {
                anyhow!("starting {}: {e}", self.program)
            }
        })?;
        let _guard = interrupt::ChildGuard::new(child.id() as i32);
        let mut stderr = child.stderr.take().expect("piped");
        let err_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let mut out = Vec::new();
        child.stdout.take().expect("piped").read_to_end(&mut out).context("reading tool output")?;
        let status = child.wait().with_context(|| format!("waiting for {}", self.program))?;
        let err = err_thread.join().unwrap_or_default();
        interrupt::check()?;
        if !status.success() {
            let text = String::from_utf8_lossy(&err);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(STDERR_TAIL)..].join("\n");
            return Err(anyhow!("`{}` failed ({status})\n{tail}", self.display()));
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
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
    }

    #[test]
    fn missing_tool_names_the_package() {
        let err = Cmd::new("mkfs.vfat-does-not-exist").run().unwrap_err();
        assert!(format!("{err:#}").contains("is not installed"), "{err:#}");
    }

    #[test]
    fn stdout_is_returned() {
        assert_eq!(Cmd::new("echo").arg("a b").run().unwrap(), "a b\n");
    }
}
