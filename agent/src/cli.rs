//! Command line of `labforge-agent`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::{config, daemon, inventory, status};

#[derive(Debug, Parser)]
#[command(name = "labforge-agent", version, about = "labforge node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (what the systemd unit starts at boot).
    Run {
        /// Node config baked into the image.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Show what the running agent reports.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Agent to ask.
        #[arg(long, default_value_t = format!("127.0.0.1:{}", config::STATUS_PORT))]
        addr: String,
    },
    /// Show the data stack the master applies: each component, its state and why. Exits 1
    /// while a component has failed, 3 while any is not ready yet (0 when all are).
    Stack {
        /// Print the stack section as JSON.
        #[arg(long)]
        json: bool,
        /// Agent to ask (the master's).
        #[arg(long, default_value_t = format!("127.0.0.1:{}", config::STATUS_PORT))]
        addr: String,
    },
    /// Show how this node got its LAN address and, on the master of a room with no DHCP
    /// server, what it serves: the LAN, every pinned lease, other DHCP servers heard.
    Network {
        /// Print the network section as JSON.
        #[arg(long)]
        json: bool,
        /// Agent to ask.
        #[arg(long, default_value_t = format!("127.0.0.1:{}", config::STATUS_PORT))]
        addr: String,
        /// Instead: broadcast one DHCPDISCOVER on this interface and print every offer that
        /// answers within 3 s as JSON (needs root). Sends nothing else; leases nothing.
        #[arg(long, value_name = "INTERFACE", conflicts_with = "unpin")]
        probe: Option<String>,
        /// Instead, on the master serving a bare switch: give back the address pinned to this
        /// MAC, for a PC that left the room for good (needs root). Refused while that address
        /// is a node of the cluster.
        #[arg(long, value_name = "MAC")]
        unpin: Option<String>,
        /// Node config baked into the image (for the state directory, with --unpin).
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Take the node inventory once and print it as JSON.
    Inventory,
    /// Show every disk, its class and what the agent does (or did) with it, and why. Changes
    /// nothing.
    Disks {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Node config baked into the image (for the `[disks]` policy).
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Import the preloaded images into containerd now (the agent does this at boot; this is
    /// for a retry by hand). Prints the result as JSON; exits non-zero if any import failed.
    ImportImages {
        /// OCI image layout to import from.
        #[arg(long, default_value = crate::preload::LAYOUT_DIR)]
        layout: PathBuf,
        /// containerd's socket.
        #[arg(long, default_value = crate::preload::CONTAINERD_SOCKET)]
        address: PathBuf,
        /// containerd namespace.
        #[arg(long, default_value = crate::preload::NAMESPACE)]
        namespace: String,
        /// Fetch blobs missing from the layout from this served layout (a netboot master's
        /// `http://MASTER:9743/pxe/preload`); a netbooted node uses its master by default.
        #[arg(long, value_name = "URL")]
        from: Option<String>,
    },
    /// The live-session systemd generator (installed as
    /// /usr/lib/systemd/system-generators/labforge-live): decides whether this boot runs from
    /// removable media with install mode on and, if so, writes the units that keep the stick
    /// read-only.
    #[command(hide = true)]
    LiveGenerator { normal: PathBuf, early: Option<PathBuf>, late: Option<PathBuf> },
    /// Netbooted nodes asking for the cluster secret, on the master (or any node holding the
    /// secret, with --addr): lists them; opens the enrolment window; approves one node.
    Enrol {
        /// Open the enrolment window for this long, e.g. 15m (any netbooted node is admitted
        /// while it is open).
        #[arg(long = "for", value_name = "DURATION")]
        open_for: Option<String>,
        /// Approve a node by its MAC or key fingerprint, as its console and this list show it.
        #[arg(long, value_name = "ID")]
        approve: Option<String>,
        /// The master's status endpoint.
        #[arg(long, default_value_t = format!("127.0.0.1:{}", config::STATUS_PORT))]
        addr: String,
        /// The cluster secret the request is signed with.
        #[arg(long, default_value = config::SECRET_PATH)]
        secret_file: PathBuf,
    },
    /// Ask a master for join info with this node's secret (checks that the secret and the
    /// exchange work; prints the info without the token).
    JoinInfo {
        /// The master's status endpoint, host:port.
        #[arg(long)]
        master: String,
        #[arg(long, default_value = config::SECRET_PATH)]
        secret_file: std::path::PathBuf,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config } => daemon::run(&config),
        Command::LiveGenerator { normal, early, .. } => {
            let early = early.unwrap_or(normal);
            let cmdline = crate::sys::fs::kernel_cmdline();
            if let Some(live) = crate::install::live::generate(
                &early,
                std::path::Path::new(config::DEFAULT_PATH),
                &cmdline,
                std::path::Path::new("/sys"),
            )? {
                eprintln!(
                    "labforge-live: booted from {} ({}) with install mode on: a live session, nothing is written to it",
                    live.disk, live.reason
                );
            }
            Ok(())
        }
        Command::Status { json, addr } => {
            let s = status::fetch(&addr)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{s}");
            }
            Ok(())
        }
        Command::Network { unpin: Some(mac), config, .. } => {
            let cfg = config::NodeConfig::load(&config)?;
            let line = crate::network::unpin::request(
                std::path::Path::new(&cfg.state_dir),
                &mac,
                std::time::Duration::from_secs(30),
            )?;
            println!("{line}");
            Ok(())
        }
        Command::Network { json, addr, probe: Some(interface), .. } => {
            let _ = (json, addr);
            let path = format!("/sys/class/net/{interface}/address");
            let mac =
                std::fs::read_to_string(&path).with_context(|| format!("{interface}: no such interface ({path})"))?;
            let mac = crate::network::dhcp::parse_mac(mac.trim())
                .with_context(|| format!("{interface} has no Ethernet address"))?;
            let offers = crate::network::dhcp::probe(&interface, &mac, crate::network::serve::PROBE_WAIT)?;
            let out: Vec<serde_json::Value> = offers
                .iter()
                .map(|o| serde_json::json!({"server": o.server.to_string(), "address": o.address.to_string()}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Network { json, addr, probe: None, unpin: None, .. } => {
            let s = status::fetch(&addr)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.network)?);
            } else {
                print!("{}", s.network.render());
            }
            Ok(())
        }
        Command::Stack { json, addr } => {
            let s = status::fetch(&addr)?;
            let Some(st) = s.stack else {
                anyhow::bail!(
                    "{} applies no stack: only the master of an image with [stack] components does (ask it with --addr MASTER:{})",
                    s.node.hostname,
                    config::STATUS_PORT
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("stack {} ({})", st.state, st.message);
                for c in &st.components {
                    let state = serde_json::to_value(c.state)?.as_str().unwrap_or_default().to_string();
                    let digest = c.applied_digest.as_deref().map(|d| &d[..12.min(d.len())]).unwrap_or("-");
                    println!("  {:<14} {:<9} {:<12} {}", c.name, state, digest, c.message);
                }
                if let Some(r) = st.last_round {
                    println!("last round: {} applied in {} ms", r.applied, r.took_ms);
                }
            }
            use crate::stack::plan::State;
            if st.components.iter().any(|c| c.state == State::Failed) {
                std::process::exit(1);
            }
            if st.components.iter().any(|c| c.state != State::Ready) {
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Enrol { open_for, approve, addr, secret_file } => {
            use crate::pxe::enrol::{AdminAction, AdminRequest};
            let mut actions = Vec::new();
            if let Some(d) = open_for {
                let d = labforge_core::config::pxe::parse_window(&d).context("--for")?;
                actions.push(AdminAction::Open { seconds: d.as_secs() });
            }
            if let Some(id) = approve {
                actions.push(AdminAction::Approve { id });
            }
            if !actions.is_empty() {
                let secret = crate::secret::Secret::load(&secret_file)?;
                let client = crate::sys::http::Client::with_timeout(std::time::Duration::from_secs(10));
                for a in actions {
                    let req = AdminRequest::new(&secret, a, crate::sys::clock::now_ms());
                    println!("{}", client.post_for_text(&format!("http://{addr}/pxe/enrol/admin"), &req)?);
                }
            }
            let s = status::fetch(&addr)?;
            let Some(e) = s.enrol else {
                anyhow::bail!("{addr} does not enrol netbooted nodes (it is not a master with [pxe] serve = true)");
            };
            print!("{}", crate::pxe::enrol::render(&e, crate::sys::clock::now_secs()));
            Ok(())
        }
        Command::JoinInfo { master, secret_file } => {
            let secret = crate::secret::Secret::load(&secret_file)?;
            let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_else(|_| "cli".into()).trim().to_string();
            let mut info = crate::cluster::join::fetch(&master, &secret, &id, crate::sys::clock::now_ms())?;
            if !info.token.is_empty() {
                info.token = "<redacted>".into();
            }
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
        Command::ImportImages { layout, address, namespace, from } => {
            let entries = crate::preload::read_layout(&layout)?;
            let containerd = crate::preload::Containerd::new(address, namespace);
            let source = match from {
                Some(url) => crate::preload::Source {
                    layout: layout.clone(),
                    remote: Some(url.trim_end_matches('/').to_string()),
                },
                None => crate::preload::Source::for_boot(&layout, &crate::sys::fs::kernel_cmdline()),
            };
            let s = crate::preload::round(&containerd, &source, &entries, Default::default(), None, &mut |_| {});
            println!("{}", serde_json::to_string_pretty(&s)?);
            if !s.failed.is_empty() {
                anyhow::bail!("{} of {} images failed to import", s.failed.len(), s.total);
            }
            Ok(())
        }
        Command::Disks { json, config } => {
            let mut cfg = config::NodeConfig::load(&config)?;
            for w in cfg.apply_cmdline(&crate::sys::fs::kernel_cmdline()) {
                eprintln!("warning: {w}");
            }
            let journal = crate::disks::journal::Journal::load(std::path::Path::new(&cfg.state_dir))?;
            let disks = crate::disks::assess(&Default::default(), &cfg.disks, &journal)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&disks)?);
                return Ok(());
            }
            println!("policy: wipe = {:?}, min-size = {}", cfg.disks.wipe.as_str(), cfg.disks.min_size);
            println!("{:<8} {:>10} {:<9} {:<5} {:<5} {:<48} REASON", "DISK", "SIZE", "CLASS", "DO", "CEPH", "BY-ID");
            for d in &disks {
                let act = match d.action {
                    crate::disks::Action::Keep => "keep",
                    crate::disks::Action::Zap => "zap",
                    crate::disks::Action::Use => "use",
                };
                let zapped = match &d.zap {
                    Some(z) => format!(" [zap {:?} on boot {}, {} attempt(s)]", z.state, z.boot, z.attempts),
                    None => String::new(),
                };
                println!(
                    "{:<8} {:>10} {:<9} {:<5} {:<5} {:<48} {} ({}){zapped}",
                    d.facts.name,
                    bytesize::ByteSize(d.facts.size_bytes).to_string(),
                    d.class.as_str(),
                    act,
                    if d.ceph { "yes" } else { "no" },
                    d.facts.by_id.first().map(String::as_str).unwrap_or("-"),
                    d.reason,
                    d.class_reason
                );
            }
            Ok(())
        }
        Command::Inventory => {
            let inv = inventory::Inventory::take(&inventory::Roots::default(), &|_| Vec::new())?;
            println!("{}", serde_json::to_string_pretty(&inv)?);
            Ok(())
        }
    }
}
