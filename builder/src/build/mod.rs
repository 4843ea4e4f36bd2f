//! `labforge build`: spec → rootfs → overlays → agent → system → boot → disk → outputs →
//! manifest. Work happens in a temporary directory under the cache dir and a staging directory
//! inside `--out`; artifacts are renamed into `--out` only when everything succeeded, manifest
//! last, so a failed or interrupted build leaves nothing half-written there.

pub mod agent;
pub mod boot;
pub mod disk;
pub mod fsutil;
pub mod kubebin;
pub mod manifest;
pub mod outputs;
pub mod overlays;
pub mod preload;
pub mod pxe;
pub mod rootfs;
pub mod stack;
pub mod system;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::spec::{self, OutputFormat, Spec};
use crate::{bmap, hostcheck, interrupt, registry};
use fsutil::WorkDir;
use labforge_core::secret::Secret;
use manifest::{Manifest, StageTiming};

/// Bump when the pipeline changes what it produces from the same inputs.
const PIPELINE_VERSION: &str = "pipeline-v4";

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub spec: PathBuf,
    pub out: PathBuf,
    pub cache_dir: PathBuf,
    pub mirror: Option<String>,
    /// labforge-agent binary to install; default: beside the labforge executable.
    pub agent: Option<PathBuf>,
    /// Rebuild even if `--out` already holds this exact build.
    pub force: bool,
    /// How to reach the registries of preloaded images.
    pub registry: crate::registry::RegistryOptions,
    /// Resolve preload tags again instead of using the lock file.
    pub update_lock: bool,
    /// The lock file (default: `<name>.lock.toml` beside the spec).
    pub lock_file: Option<PathBuf>,
    /// Plan only, without the network: tags the lock file does not pin stay unresolved.
    pub offline: bool,
}

/// The digest shown for a tag that an offline plan did not resolve.
pub const UNRESOLVED: &str = "unresolved";

/// `<name>.cluster.secret`, written beside the outputs when the build generated the secret.
pub fn secret_file_name(image: &str) -> String {
    format!("{image}.cluster.secret")
}

/// Default cache dir: `$XDG_CACHE_HOME/labforge` or `~/.cache/labforge`.
pub fn default_cache_dir() -> PathBuf {
    // Set but empty counts as unset (the XDG base directory rule).
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    set("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("labforge")
}

/// Where the cluster secret baked into the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `cluster-secret-file` in the spec.
    Spec(PathBuf),
    /// `<out>/<name>.cluster.secret` from an earlier build: rebuilt images keep their cluster.
    Previous(PathBuf),
    /// Made for this build, written to `<out>/<name>.cluster.secret`.
    Generated,
}

/// The resolved spec and everything derived from it before any work is done.
pub struct Plan {
    pub spec: Spec,
    pub secret: Secret,
    pub secret_source: SecretSource,
    pub rootfs: rootfs::RootfsPlan,
    pub agent: PathBuf,
    pub input_hash: String,
    pub rootfs_key: String,
    /// Preloaded images pinned to manifest digests, in spec order: (ref, digest).
    pub preload: Vec<(String, String)>,
    pub lock_path: PathBuf,
    /// The client that resolved them (None without preloads).
    pub registry: Option<crate::registry::Registry>,
    /// Kubernetes release files pinned to their sha256 (`[kubernetes] source = "binaries"`).
    pub binaries: Vec<kubebin::Pinned>,
    /// The stack's components in the order the master applies them, rendered and checked.
    pub stack: Vec<labforge_core::stack::ResolvedComponent>,
    /// The preloaded images kubeadm itself named (`kubeadm config images list`): a node
    /// imports them first and starts kubeadm once they are in (see `preload::import_order`).
    pub cluster_images: Vec<String>,
}

impl Plan {
    pub fn new(opts: &BuildOptions) -> Result<Self> {
        let mut spec = spec::load(&opts.spec)?;
        if let Some(m) = &opts.mirror {
            spec.base.mirror = Some(m.clone());
        }
        overlays::check_templates(&spec)?;
        let rootfs = rootfs::RootfsPlan::new(&spec);
        rootfs.preflight()?;
        let agent = agent::locate_binary(opts.agent.as_deref())?;
        let previous = opts.out.join(secret_file_name(&spec.name));
        let (secret, secret_source) = match &spec.cluster_secret_file {
            Some(p) => (Secret::load(p)?, SecretSource::Spec(p.clone())),
            None if previous.is_file() => (Secret::load(&previous)?, SecretSource::Previous(previous)),
            None => (Secret::generate()?, SecretSource::Generated),
        };
        let rootfs_key = rootfs.cache_key()?;
        let lock_path = opts.lock_file.clone().unwrap_or_else(|| registry::lock::path_for(&opts.spec, &spec.name));
        let lock = if opts.update_lock { Default::default() } else { registry::lock::LockFile::load(&lock_path)? };
        let binaries = if opts.offline {
            kubebin::resolve_offline(&spec.kubernetes, &lock)
        } else {
            kubebin::resolve(&spec.kubernetes, &lock)?
        };
        let ask_kubeadm = !opts.offline
            || spec.kubernetes.source == spec::KubernetesSource::Packages
            || kubebin::kubeadm_cached(&binaries, &opts.cache_dir);
        if spec.kubernetes.enabled && !ask_kubeadm {
            tracing::warn!(
                "kubeadm {} is not in the cache: the control plane's images are not listed here (the build asks kubeadm)",
                spec.kubernetes.version
            );
        }
        let mut cluster_images = Vec::new();
        if spec.kubernetes.enabled && ask_kubeadm {
            // The control plane's images, as the image's own kubeadm names them, join the
            // preload set (after the spec's own, without repeats).
            cluster_images = kubebin::control_plane_images(&spec.kubernetes, &binaries, &opts.cache_dir)?;
            for r in &cluster_images {
                if !spec.preload.iter().any(|p| &p.reference == r) {
                    spec.preload.push(spec::Preload { reference: r.clone() });
                }
            }
        }
        // Every image a stack component declares is preloaded: no node ever pulls.
        let mut stack_components = stack::resolve(&spec.stack)?;
        if !stack_components.is_empty() && !spec.kubernetes.enabled {
            anyhow::bail!(
                "[stack] components need Kubernetes: set [kubernetes] enabled = true, or remove the components"
            );
        }
        stack::fetch_upstream(&mut stack_components, &opts.cache_dir, opts.offline)?;
        for r in stack::declared_images(&stack_components) {
            if !spec.preload.iter().any(|p| p.reference == r) {
                spec.preload.push(spec::Preload { reference: r });
            }
        }
        let refs: Vec<String> = spec.preload.iter().map(|p| p.reference.clone()).collect();
        stack::check_names(&mut stack_components, &stack::build_facts(&spec)?, &refs)?;
        let (preload, registry) = if spec.preload.is_empty() {
            (Vec::new(), None)
        } else if opts.offline {
            let pinned = spec
                .preload
                .iter()
                .map(|p| {
                    let digest = lock
                        .get(&p.reference)
                        .map(str::to_string)
                        .or_else(|| p.reference.split_once('@').map(|(_, d)| d.to_string()))
                        .unwrap_or_else(|| UNRESOLVED.to_string());
                    (p.reference.clone(), digest)
                })
                .collect();
            (pinned, None)
        } else {
            let ropts =
                registry::with_loopback_plain(&opts.registry, spec.preload.iter().map(|p| p.reference.as_str()));
            let reg = registry::Registry::new(&ropts, &opts.cache_dir)?;
            let refs: Vec<(String, Option<String>)> = spec
                .preload
                .iter()
                .map(|p| (p.reference.clone(), lock.get(&p.reference).map(str::to_string)))
                .collect();
            let digests = reg.resolve_all(&refs)?;
            (refs.into_iter().map(|(r, _)| r).zip(digests).collect(), Some(reg))
        };
        stack::check(&mut stack_components, &stack::build_facts(&spec)?, &preload)?;
        let mut h = Sha256::new();
        h.update(format!("{PIPELINE_VERSION}\0{}\0{rootfs_key}\0", env!("CARGO_PKG_VERSION")));
        h.update(serde_json::to_vec(&spec)?);
        h.update(overlays::hash_overlays(&spec.overlays)?);
        h.update(fs::read(&agent).with_context(|| format!("reading {}", agent.display()))?);
        h.update(fs::read(hostcheck::EFI_STUB).unwrap_or_default());
        h.update(Sha256::digest(secret.bytes()));
        for (r, d) in &preload {
            h.update(format!("preload\0{r}\0{d}\0"));
        }
        for r in &cluster_images {
            h.update(format!("cluster-image\0{r}\0"));
        }
        for b in &binaries {
            h.update(format!("binary\0{}\0{}\0", b.url, b.sha256));
        }
        for c in &stack_components {
            h.update(format!("stack\0{}\0{}\0", c.name, c.build_digest));
            h.update(serde_json::to_vec(c)?);
        }
        Ok(Plan {
            spec,
            secret,
            secret_source,
            rootfs,
            agent,
            input_hash: hex::encode(h.finalize()),
            rootfs_key,
            preload,
            lock_path,
            registry,
            binaries,
            stack: stack_components,
            cluster_images,
        })
    }

    /// The lock file's contents for this plan.
    pub fn lock(&self) -> registry::lock::LockFile {
        registry::lock::LockFile {
            image: self
                .preload
                .iter()
                .map(|(r, d)| registry::lock::Locked { reference: r.clone(), digest: d.clone() })
                .collect(),
            file: kubebin::locked(
                &self.binaries.iter().cloned().chain(stack::upstream_pins(&self.stack)).collect::<Vec<_>>(),
            ),
        }
    }

    fn file(&self, format: OutputFormat) -> String {
        let n = &self.spec.name;
        match format {
            OutputFormat::Raw => format!("{n}.img"),
            OutputFormat::Zst => format!("{n}.img.zst"),
            OutputFormat::Bmap => format!("{n}.img.bmap"),
            OutputFormat::Qcow2 => format!("{n}.qcow2"),
            OutputFormat::Pxe => format!("{n}.ipxe"),
        }
    }

    pub fn manifest_file(&self) -> String {
        format!("{}.manifest.json", self.spec.name)
    }
}

/// Times stages, and shows a spinner on a terminal or plain lines otherwise.
struct Stages {
    timings: Vec<StageTiming>,
    bar: Option<indicatif::ProgressBar>,
}

impl Stages {
    fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("template"));
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        Stages { timings: Vec::new(), bar }
    }

    fn run<T>(&mut self, name: &'static str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.run_cached(name, what, || f().map(|v| (v, false)))
    }

    /// Like `run`, for a stage that may be served from the cache (`f` says whether it was).
    fn run_cached<T>(&mut self, name: &'static str, what: &str, f: impl FnOnce() -> Result<(T, bool)>) -> Result<T> {
        interrupt::check()?;
        match &self.bar {
            Some(b) => b.set_message(format!("{name}: {what}")),
            None => tracing::info!("{name}: {what}"),
        }
        let start = Instant::now();
        let (value, cached) = f().with_context(|| format!("stage {name}"))?;
        let seconds = start.elapsed().as_secs_f64();
        let note = if cached { " (cached)" } else { "" };
        match &self.bar {
            Some(b) => b.println(format!("  {name:<9} {seconds:>6.1}s{note}")),
            None => tracing::info!("{name}: done in {seconds:.1}s{note}"),
        }
        self.timings.push(StageTiming { stage: name.into(), seconds, cached });
        Ok(value)
    }
}

impl Drop for Stages {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// What a build produced.
#[derive(Debug)]
pub struct Outcome {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    /// True when `--out` already held this exact build and nothing was done.
    pub up_to_date: bool,
}

pub fn build(opts: &BuildOptions) -> Result<Outcome> {
    let plan = Plan::new(opts)?;
    let mut needs: Vec<&str> = Vec::new();
    if plan.spec.outputs.contains(&OutputFormat::Qcow2) {
        needs.push("qemu-img");
    }
    if plan.spec.outputs.contains(&OutputFormat::Pxe) {
        needs.push("mksquashfs");
    }
    if plan.spec.base.repositories.iter().any(|r| r.key_fingerprint.is_some()) {
        needs.push("gpg");
    }
    if plan.spec.base.repositories.iter().any(|r| r.key_url.is_some()) {
        needs.push("curl");
    }
    hostcheck::require_for_build(&needs)?;
    if nix::unistd::geteuid().as_raw() != 0 {
        anyhow::bail!(
            "labforge build must run as root (it installs packages into a tree and sets file owners); run it with sudo"
        );
    }

    fs::create_dir_all(&opts.out).with_context(|| format!("creating output directory {}", opts.out.display()))?;
    let manifest_path = opts.out.join(plan.manifest_file());
    if !opts.force {
        if let Some(m) = manifest::existing(&manifest_path, &plan.input_hash, &opts.out) {
            tracing::info!("{} is up to date (input hash {})", manifest_path.display(), &plan.input_hash[..12]);
            save_lock(&plan)?;
            return Ok(Outcome { manifest: m, manifest_path, up_to_date: true });
        }
    }
    // Only one build writes into an output directory at a time.
    let out_lock =
        fs::File::open(&opts.out).with_context(|| format!("opening output directory {}", opts.out.display()))?;
    let _out_lock = nix::fcntl::Flock::lock(out_lock, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!("another labforge build is writing to {}; wait for it or use another --out", opts.out.display())
    })?;
    let staging = WorkDir::new_in(&opts.out, ".labforge-staging-")
        .map_err(|e| e.context(format!("output directory {} is not writable", opts.out.display())))?;
    let work = WorkDir::new_in(&opts.cache_dir.join("tmp"), "build-")?;
    let started = Instant::now();
    let mut stages = Stages::new();
    let spec = &plan.spec;

    // Pull before the slow rootfs stage: an image that cannot be had fails the build early.
    let pulled = match &plan.registry {
        Some(reg) => stages.run("pull", "pulling preloaded images", || {
            let pulled = reg.fetch_all(&plan.preload)?;
            let moved = reg.transfer.bytes.load(std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                "preload: {} images, {} MiB, {} MiB transferred",
                pulled.len(),
                pulled.iter().map(|p| p.size_bytes).sum::<u64>() >> 20,
                moved >> 20
            );
            Ok(pulled)
        })?,
        None => Vec::new(),
    };
    let binaries = if plan.binaries.is_empty() {
        Vec::new()
    } else {
        stages.run("binaries", "downloading the Kubernetes release files", || {
            kubebin::fetch_all(&plan.binaries, &opts.cache_dir)
        })?
    };
    let tar = stages
        .run_cached("rootfs", "installing packages", || rootfs::ensure(&plan.rootfs, &opts.cache_dir, work.path()))?;
    // The unpacked tree is written once and read once: keep it in memory when there is room.
    let fast = fsutil::fast_scratch(fs::metadata(&tar)?.len() + spec.disk.root_size.bytes())
        .map(|dir| WorkDir::new_in(&dir, "labforge-root-"))
        .transpose()?;
    let root = fast.as_ref().map(|w| w.path()).unwrap_or(work.path()).join("root");
    stages.run("unpack", "unpacking root filesystem", || rootfs::unpack(&tar, &root))?;
    let packages = rootfs::installed_packages(&root)?;
    if !binaries.is_empty() {
        stages.run("kubernetes", "installing kubeadm, kubelet, kubectl and the CNI plugins", || {
            kubebin::install(&root, &plan.binaries, &binaries)
        })?;
    }
    stages.run("overlays", "applying overlays", || overlays::apply(spec, &root))?;
    stages.run("agent", "installing labforge-agent", || agent::install(spec, &root, &plan.agent, &plan.secret))?;
    if !plan.stack.is_empty() {
        stages.run("stack", "writing the stack's components", || stack::install(&root, &plan.stack, &spec.lab))?;
    }
    // Packages: the list comes from the kubeadm the packages installed (the pinned one's was
    // asked at plan time). Without one, nothing is marked and kubeadm waits for every image.
    let cluster_images = if plan.cluster_images.is_empty() && spec.kubernetes.enabled && !pulled.is_empty() {
        kubebin::images_of_root(&root, &spec.kubernetes).unwrap_or_else(|e| {
            tracing::warn!(
                "the image's kubeadm did not list its images ({e:#}): kubeadm will wait for every preloaded image"
            );
            Vec::new()
        })
    } else {
        plan.cluster_images.clone()
    };
    let preloaded = preload::import_order(&pulled, &preload::sandbox_image(&root), &cluster_images);
    if let Some(reg) = &plan.registry {
        stages
            .run("preload", "writing the preloaded images", || preload::write_layout(&root, &preloaded, reg.cache()))?;
    }
    stages.run("system", "users, fstab, security checks", || system::configure(spec, &root))?;

    let layout = disk::Layout::new(spec, &plan.input_hash);
    let kernel = boot::find_kernel(&root)?;
    let uki = work.path().join("uki.efi");
    stages.run("boot", "assembling the UKI", || {
        boot::build_uki(&root, &kernel, &disk::cmdline(&layout, spec), work.path(), &uki)
    })?;
    let pxe_files = if spec.outputs.contains(&OutputFormat::Pxe) {
        stages.run("pxe", "netboot kernel, initrd, squashfs and iPXE script", || {
            pxe::build(spec, &root, &kernel, &uki, &layout, &plan.input_hash, staging.path())
        })?
    } else {
        Vec::new()
    };
    let raw = staging.path().join(plan.file(OutputFormat::Raw));
    stages.run("disk", "making filesystems and the GPT disk", || {
        disk::check_root_fits(&root, &layout)?;
        disk::assemble(&layout, &root, &uki, work.path(), &raw)?;
        disk::write_install_manifest(&layout, &raw, &uki, &spec.name, &plan.input_hash, work.path())
    })?;
    // The unpacked tree is no longer needed; free the space before writing outputs.
    drop(fs::remove_dir_all(&root));

    drop(fast);

    let mut files = Vec::new();
    let mut known = Vec::new();
    stages.run("outputs", "compressing and mapping", || {
        let wants = |f| spec.outputs.contains(&f);
        std::thread::scope(|s| -> Result<()> {
            let zst = wants(OutputFormat::Zst).then(|| {
                let dst = staging.path().join(plan.file(OutputFormat::Zst));
                let raw = &raw;
                (dst.clone(), s.spawn(move || outputs::zstd(raw, &dst)))
            });
            if wants(OutputFormat::Bmap) {
                let dst = staging.path().join(plan.file(OutputFormat::Bmap));
                fs::write(&dst, bmap::create(&raw)?)?;
                files.push(dst);
            }
            if wants(OutputFormat::Qcow2) {
                let dst = staging.path().join(plan.file(OutputFormat::Qcow2));
                outputs::qcow2(&raw, &dst)?;
                files.push(dst);
            }
            if let Some((dst, h)) = zst {
                let (raw_sum, zst_sum) = h.join().expect("zstd thread")?;
                known.push((raw.clone(), raw_sum));
                known.push((dst.clone(), zst_sum));
                files.push(dst);
            }
            Ok(())
        })?;
        files.extend(pxe_files.iter().cloned());
        if wants(OutputFormat::Raw) {
            files.insert(0, raw.clone());
        } else {
            fs::remove_file(&raw)?;
        }
        Ok(())
    })?;
    let artifacts = stages.run("hash", "hashing artifacts", || outputs::describe(&files, &known))?;

    let mut manifest = Manifest::new(
        &plan,
        &layout,
        &kernel.version,
        packages,
        artifacts,
        stages.timings.clone(),
        started.elapsed().as_secs_f64(),
    );
    manifest.preload = preloaded.iter().map(|p| (&p.image).into()).collect();
    manifest.stack = plan.stack.iter().map(Into::into).collect();
    let staged_manifest = staging.path().join(plan.manifest_file());
    fs::write(&staged_manifest, serde_json::to_vec_pretty(&manifest)?)?;
    let mut promoted = files.clone();
    if plan.secret_source == SecretSource::Generated {
        let f = staging.path().join(secret_file_name(&spec.name));
        plan.secret.write_new(&f)?;
        promoted.push(f);
    }
    interrupt::check()?;
    promote(&promoted, &staged_manifest, &opts.out)?;
    save_lock(&plan)?;
    if plan.secret_source == SecretSource::Generated {
        tracing::info!(
            "generated a new cluster secret: {} (keep it: images built with it form one cluster)",
            opts.out.join(secret_file_name(&spec.name)).display()
        );
    }
    Ok(Outcome { manifest, manifest_path, up_to_date: false })
}

/// Records the preload and release-file pins beside the spec (only when there are any, and
/// only if changed).
fn save_lock(plan: &Plan) -> Result<()> {
    if plan.preload.is_empty() && plan.binaries.is_empty() {
        return Ok(());
    }
    if plan.lock().save(&plan.lock_path)? {
        tracing::info!(
            "pinned {} preloaded images and {} release files in {}",
            plan.preload.len(),
            plan.binaries.len(),
            plan.lock_path.display()
        );
    }
    Ok(())
}

/// The mode of every artifact in `--out` (the manifest, which holds only hashes, stays 0644).
pub const ARTIFACT_MODE: u32 = 0o600;

/// Moves the staged artifacts into `out`, the manifest last: a manifest in `out` means every
/// artifact it lists is complete. An older manifest is removed first, so an interruption in
/// the middle never leaves a manifest that describes other files.
fn promote(files: &[PathBuf], manifest: &Path, out: &Path) -> Result<()> {
    let final_manifest = out.join(manifest.file_name().expect("file"));
    if final_manifest.exists() {
        fs::remove_file(&final_manifest)?;
    }
    for f in files {
        let dest = out.join(f.file_name().expect("file"));
        // Disk images and the squashfs carry the cluster secret: readable by their owner only.
        fs::set_permissions(f, fs::Permissions::from_mode(ARTIFACT_MODE))
            .with_context(|| format!("restricting {}", f.display()))?;
        fs::rename(f, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
    }
    fs::rename(manifest, &final_manifest).with_context(|| format!("moving {} into place", final_manifest.display()))?;
    // Make the renames durable.
    fs::File::open(out).and_then(|d| d.sync_all()).ok();
    Ok(())
}

#[cfg(test)]
mod promote_tests {
    use super::*;

    #[test]
    fn artifacts_land_owner_only_and_the_manifest_last() {
        let d = tempfile::tempdir().unwrap();
        let (stage, out) = (d.path().join("stage"), d.path().join("out"));
        fs::create_dir_all(&stage).unwrap();
        fs::create_dir_all(&out).unwrap();
        let files: Vec<PathBuf> = ["demo.img", "demo.img.zst", "demo.squashfs", "demo.cluster.secret"]
            .iter()
            .map(|n| {
                let p = stage.join(n);
                fs::write(&p, n).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
                p
            })
            .collect();
        let manifest = stage.join("demo.manifest.json");
        fs::write(&manifest, "{}").unwrap();
        fs::set_permissions(&manifest, fs::Permissions::from_mode(0o644)).unwrap();
        promote(&files, &manifest, &out).unwrap();
        for n in ["demo.img", "demo.img.zst", "demo.squashfs", "demo.cluster.secret"] {
            let mode = fs::metadata(out.join(n)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{n}");
        }
        assert_eq!(fs::metadata(out.join("demo.manifest.json")).unwrap().permissions().mode() & 0o777, 0o644);
    }
}
