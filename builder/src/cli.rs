//! Command line of `labforge`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::build::{self, BuildOptions};
use crate::hostcheck;

#[derive(Debug, Parser)]
#[command(name = "labforge", version, about = "Build bootable lab-cluster images from a TOML spec")]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct SpecArgs {
    /// Image spec (TOML).
    pub spec: PathBuf,
    /// Package mirror to use instead of the spec's.
    #[arg(long)]
    pub mirror: Option<String>,
    /// labforge-agent binary to install (default: the one beside this labforge).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Cache for root filesystems, image blobs and temporary files.
    #[arg(long, env = "LABFORGE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Speak plain HTTP to this registry (host:port); repeatable.
    #[arg(long, value_name = "REGISTRY")]
    pub plain_http: Vec<String>,
    /// Trust this CA certificate (PEM) for HTTPS registries; repeatable.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Vec<PathBuf>,
    /// Resolve preload tags again instead of using the lock file, and rewrite it.
    #[arg(long)]
    pub update_lock: bool,
    /// Lock file (default: <name>.lock.toml beside the spec).
    #[arg(long)]
    pub lock_file: Option<PathBuf>,
    /// Image blobs downloaded at once.
    #[arg(long, default_value_t = labforge_registry_default_parallel())]
    pub parallel: usize,
}

fn labforge_registry_default_parallel() -> usize {
    crate::registry::DEFAULT_PARALLEL
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the disk image and its outputs.
    Build {
        #[command(flatten)]
        spec: SpecArgs,
        /// Output directory.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Rebuild even if the output directory already holds this exact build.
        #[arg(long)]
        force: bool,
        /// Print the manifest as JSON on stdout when done.
        #[arg(long)]
        json: bool,
    },
    /// Resolve and check a spec and show what a build would do, without building.
    Plan {
        #[command(flatten)]
        spec: SpecArgs,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List missing host tools and the Debian package that provides each.
    Doctor {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Print only the names of packages to install, one per line.
        #[arg(long, conflicts_with = "json")]
        packages: bool,
    },
    /// Cluster secrets.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Container images carried by a built image.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Write an image to a USB stick: only the blocks its block map lists, checked on the way
    /// and read back afterwards. Refuses internal and mounted disks unless --force.
    Flash {
        /// The image: `<name>.img` or `<name>.img.zst` (decompressed as it is written).
        image: PathBuf,
        /// The whole-disk device (`/dev/sdX`, `/dev/disk/by-id/usb-…`), or a file.
        device: PathBuf,
        /// Block map (default: `<name>.img.bmap` beside the image).
        #[arg(long, conflicts_with = "no_bmap")]
        bmap: Option<PathBuf>,
        /// Write every block the image holds, ignoring any block map.
        #[arg(long)]
        no_bmap: bool,
        /// Write to a device that is not removable, or that is mounted or in use.
        #[arg(long)]
        force: bool,
        /// Print what was done as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show what a built image holds (from its manifest).
    Inspect {
        /// The image (`.img`, `.img.zst`, `.qcow2`) or its manifest.
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Write a new cluster secret (32 random bytes as hex, mode 0600) to FILE.
    New { file: PathBuf },
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

fn options(spec: SpecArgs, out: PathBuf, force: bool) -> BuildOptions {
    BuildOptions {
        spec: spec.spec,
        out,
        cache_dir: spec.cache_dir.unwrap_or_else(build::default_cache_dir),
        mirror: spec.mirror,
        agent: spec.agent,
        force,
        registry: crate::registry::RegistryOptions {
            plain_http: spec.plain_http,
            ca_files: spec.ca_file,
            parallel: spec.parallel,
        },
        update_lock: spec.update_lock,
        lock_file: spec.lock_file,
        offline: false,
    }
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Resolve and download a spec's preloaded images into the cache (and pin them in the
    /// lock file), so a later build needs no registry.
    Pull {
        #[command(flatten)]
        spec: SpecArgs,
        #[arg(long)]
        json: bool,
    },
    /// List the preloaded container images inside a raw image file (ref, digest, size).
    Ls {
        /// The raw image (`<name>.img`).
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build { spec, out, force, json } => {
            let outcome = build::build(&options(spec, out, force))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome.manifest)?);
            } else {
                let m = &outcome.manifest;
                let verb = if outcome.up_to_date { "up to date" } else { "built" };
                eprintln!("{} {verb} ({})", m.name, outcome.manifest_path.display());
                for a in &m.artifacts {
                    eprintln!("  {:<24} {:>8} MiB  sha256:{}", a.file, a.size_bytes >> 20, &a.sha256[..16]);
                }
            }
            Ok(())
        }
        Command::Plan { spec, json } => {
            // A plan never touches the network: tags the lock file does not pin show as
            // unresolved.
            let opts = BuildOptions { offline: true, ..options(spec, PathBuf::from("out"), false) };
            let plan = build::Plan::new(&opts)?;
            let layout = build::disk::Layout::new(&plan.spec, &plan.input_hash);
            let cmd = plan.rootfs.command(std::path::Path::new("<rootfs.tar>"), std::path::Path::new("<tmp>"), &[]);
            let cached = opts.cache_dir.join("rootfs").join(format!("{}.tar", plan.rootfs_key)).is_file();
            let value = serde_json::json!({
                "name": plan.spec.name,
                "input-hash": plan.input_hash,
                "rootfs": { "cache-key": plan.rootfs_key, "cached": cached, "command": cmd.display(),
                            "packages": plan.rootfs.packages, "keyring": plan.rootfs.keyring },
                "overlays": plan.spec.overlays,
                "agent": plan.agent,
                "disk": layout,
                "kernel-cmdline": build::disk::cmdline(&layout, &plan.spec),
                "outputs": plan.spec.outputs,
                "preload": plan.preload.iter().map(|(r, d)| serde_json::json!({"ref": r, "digest": d})).collect::<Vec<_>>(),
                "stack": plan.stack.iter().map(|c| serde_json::json!({
                    "name": c.name, "namespace": c.namespace, "origin": c.origin, "depends-on": c.depends_on,
                    "images": c.images, "settings": c.settings, "digest": c.build_digest,
                    "upstream": c.upstream.iter().map(|u| serde_json::json!({
                        "name": u.name, "url": u.url, "sha256": u.sha256, "cached": !u.text.is_empty(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "disks": plan.spec.disks,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("image      {}", plan.spec.name);
                println!("input hash {}", plan.input_hash);
                println!(
                    "rootfs     {} ({})",
                    &plan.rootfs_key[..16],
                    if cached { "cached" } else { "will run mmdebstrap" }
                );
                println!("           {}", cmd.display());
                for o in &plan.spec.overlays {
                    println!("overlay    {}", o.display());
                }
                for p in &layout.partitions {
                    println!("partition  {:<15} {:>6} MiB", p.label, p.size_bytes >> 20);
                }
                println!("cmdline    {}", build::disk::cmdline(&layout, &plan.spec));
                let d = &plan.spec.disks;
                let selected = match &d.select {
                    Some(m) => format!(
                        ", match by-id {:?} size {}",
                        m.by_id,
                        m.size.map(|r| r.to_string()).unwrap_or_else(|| "any".into())
                    ),
                    None => String::new(),
                };
                println!("disks      wipe = {}, min-size {}{selected}", d.wipe.as_str(), d.min_size);
                if d.wipe == labforge_core::config::disks::Wipe::Force
                    && d.select.as_ref().is_some_and(|m| m.by_id.is_empty())
                {
                    eprintln!("warning: wipe = \"force\" selects disks by size alone; a disk holding data in that range is wiped. The agent never wipes the OS disk, removable disks or Ceph OSDs, but naming the disks by id is safer.");
                }
                for (r, d) in &plan.preload {
                    if d == build::UNRESOLVED {
                        println!("preload    {r} (unresolved: not pinned in the lock file; the build resolves it)");
                    } else {
                        println!("preload    {r} {d}");
                    }
                }
                for (i, c) in plan.stack.iter().enumerate() {
                    let after = if c.depends_on.is_empty() {
                        String::new()
                    } else {
                        format!(" after {}", c.depends_on.join(", "))
                    };
                    println!("stack {:>2}   {} (namespace {}, {}){after}", i + 1, c.name, c.namespace, c.origin);
                    for (k, r) in &c.images {
                        println!("             image {k} {r}");
                    }
                    for u in &c.upstream {
                        let cached = if u.text.is_empty() { "not cached: the build downloads it" } else { "cached" };
                        println!("             upstream {} {} sha256:{} ({cached})", u.name, u.url, &u.sha256[..12]);
                    }
                }
            }
            Ok(())
        }
        Command::Doctor { json, packages } => {
            let checks = hostcheck::check_all();
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else if packages {
                let mut pkgs: Vec<&str> = checks.iter().filter(|c| c.found.is_none()).map(|c| c.package).collect();
                pkgs.dedup();
                for p in pkgs {
                    println!("{p}");
                }
                return Ok(());
            } else {
                for c in &checks {
                    let state = match &c.found {
                        Some(p) => format!("ok      {}", p.display()),
                        None => format!("MISSING apt-get install {}", c.package),
                    };
                    println!("{:<48} {state}  ({})", c.what, c.purpose);
                }
            }
            let missing: Vec<_> = checks.iter().filter(|c| c.required && c.found.is_none()).collect();
            if !missing.is_empty() {
                anyhow::bail!("{} required host tool(s) missing; install the packages listed above", missing.len());
            }
            Ok(())
        }
        Command::Secret { command: SecretCommand::New { file } } => {
            labforge_core::secret::Secret::generate()?.write_new(&file)?;
            eprintln!("wrote a new cluster secret to {} (mode 0600); name it in the spec as cluster-secret-file, or put it on a LABFORGE config partition as cluster.secret", file.display());
            Ok(())
        }
        Command::Images { command: ImagesCommand::Pull { spec, json } } => {
            let started = std::time::Instant::now();
            let opts = options(spec, PathBuf::from("out"), false);
            let plan = build::Plan::new(&opts)?;
            let Some(reg) = &plan.registry else {
                eprintln!("{} preloads no images", plan.spec.name);
                return Ok(());
            };
            let pulled = reg.fetch_all(&plan.preload)?;
            plan.lock().save(&plan.lock_path)?;
            let moved = reg.transfer.bytes.load(std::sync::atomic::Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "images": pulled, "transferred_bytes": moved, "seconds": secs, "lock_file": plan.lock_path,
                    }))?
                );
            } else {
                for p in &pulled {
                    eprintln!(
                        "  {:<56} {}  {:>10}",
                        p.name,
                        &p.digest[..19],
                        bytesize::ByteSize(p.size_bytes).to_string()
                    );
                }
                let total: u64 = pulled.iter().map(|p| p.size_bytes).sum();
                eprintln!(
                    "{} images, {} ({} transferred) in {secs:.1}s; pinned in {}",
                    pulled.len(),
                    bytesize::ByteSize(total),
                    bytesize::ByteSize(moved),
                    plan.lock_path.display()
                );
            }
            Ok(())
        }
        Command::Images { command: ImagesCommand::Ls { image, json } } => {
            let list = crate::inspect::preloaded_images(&image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("{} carries no preloaded images", image.display());
            } else {
                println!("{:<56} {:<19} {:>10}  ORDER", "REF", "DIGEST", "SIZE");
                for i in &list {
                    let line = format!(
                        "{:<56} {:<19} {:>10}  {}",
                        i.name,
                        &i.digest[..19.min(i.digest.len())],
                        bytesize::ByteSize(i.size_bytes).to_string(),
                        if i.cluster { "first" } else { "" }
                    );
                    println!("{}", line.trim_end());
                }
                if list.iter().any(|i| i.cluster) {
                    eprintln!(
                        "first: containerd's sandbox image and the images kubeadm listed, imported before the rest; kubeadm starts once they are in"
                    );
                }
            }
            Ok(())
        }
        Command::Flash { image, device, bmap, no_bmap, force, json } => {
            let opts = crate::flash::FlashOptions { image, target: device, bmap, no_bmap, force };
            let done = crate::flash::flash(&opts, &labforge_core::disk::probe::Roots::default())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                eprintln!(
                    "{} written to {} and verified ({} in {:.1}s + {:.1}s verify)",
                    done.image.display(),
                    done.target.display(),
                    bytesize::ByteSize(done.written_bytes),
                    done.write_seconds,
                    done.verify_seconds
                );
            }
            Ok(())
        }
        Command::Inspect { image, json } => {
            let manifest = crate::inspect::find_manifest(&image)?;
            let text = std::fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
            let m: build::manifest::Manifest =
                serde_json::from_slice(&text).with_context(|| format!("parsing {}", manifest.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                crate::inspect::print(&m, &manifest)?;
            }
            Ok(())
        }
    }
}
