//! `labforge-vm IMAGE`: boots a labforge image in QEMU (UEFI, no network route out), waits for
//! the agent's status line and prints what it reports. `make demo` uses it.

use std::time::Duration;

use anyhow::{Context, Result};
use labforge_agent::status::{Phase, Status, CONSOLE_PREFIX};
use qemu_tests::vm;

fn main() {
    if let Err(e) = run() {
        eprintln!("labforge-vm: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let image = std::env::args_os().nth(1).context("usage: labforge-vm IMAGE")?;
    let image = std::path::PathBuf::from(image);
    let dir = vm::scenario_dir("labforge-vm")?;
    eprintln!("booting {} in QEMU (console log: {})", image.display(), dir.join("node-console.log").display());
    let mut node = vm::Vm::start(&vm::VmConfig::new("node", &image), &dir)?;
    let parse = |line: &str| -> Option<Status> {
        serde_json::from_str(&line[line.find(CONSOLE_PREFIX)? + CONSOLE_PREFIX.len()..]).ok()
    };
    let first = node.wait_for(CONSOLE_PREFIX, Duration::from_secs(600))?;
    let first = parse(&first).context("parsing the agent's status line")?;
    eprintln!("agent up (phase {}); waiting for it to settle into a role...", first.phase);
    // A lone node elects itself once its settle window has passed; a node that cannot join a
    // cluster says why (needs-secret, conflict, error).
    let line = node.wait_for_match(
        |l| {
            parse(l)
                .is_some_and(|s| matches!(s.phase, Phase::Ready | Phase::NeedsSecret | Phase::Conflict | Phase::Error))
        },
        "a settled phase",
        Duration::from_secs(300),
    )?;
    let status = parse(&line).expect("matched");
    println!("The agent on the booted node reports:\n");
    print!("{status}");
    node.wait_for("Multi-User System", Duration::from_secs(300))?;
    node.check_console_health()?;
    println!("\nThe node reached multi-user with no failed unit; powering it off.");
    Ok(())
}
