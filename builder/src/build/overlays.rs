//! Stage `overlays`: file trees laid onto the root filesystem in spec order. `*.j2` files are
//! rendered with minijinja (strict: an unknown variable is an error). Files become root-owned
//! with the source's mode minus group/world write; `[files]` in the spec sets other modes/owners.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::fsutil::resolve_in_root;
use crate::spec::Spec;

/// Template context: `spec` is the resolved spec (kebab-case keys, so `spec["disk"]["root-size"]`).
fn template_env(spec: &Spec) -> (minijinja::Environment<'static>, minijinja::Value) {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    let ctx = minijinja::context! {
        spec => minijinja::Value::from_serialize(spec),
        labforge_version => env!("CARGO_PKG_VERSION"),
    };
    (env, ctx)
}

/// Hash of every overlay's paths, modes, link targets and contents (part of the input hash).
pub fn hash_overlays(overlays: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for dir in overlays {
        for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
            let e = e.with_context(|| format!("reading overlay {}", dir.display()))?;
            let rel = e.path().strip_prefix(dir).expect("below overlay");
            let m = e.path().symlink_metadata()?;
            h.update(format!("\0{}\0{:o}\0", rel.display(), m.mode()));
            if m.file_type().is_symlink() {
                h.update(fs::read_link(e.path())?.as_os_str().as_encoded_bytes());
            } else if m.is_file() {
                h.update(fs::read(e.path())?);
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Renders every template of every overlay without writing anything, so a template error is
/// reported before any package is downloaded.
pub fn check_templates(spec: &Spec) -> Result<()> {
    let (env, ctx) = template_env(spec);
    for dir in &spec.overlays {
        for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
            let e = e.with_context(|| format!("reading overlay {}", dir.display()))?;
            if e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "j2") {
                let source =
                    fs::read_to_string(e.path()).with_context(|| format!("reading template {}", e.path().display()))?;
                env.render_str(&source, ctx.clone()).map_err(|err| template_error(e.path(), &err))?;
            }
        }
    }
    Ok(())
}

/// Applies every overlay of the spec onto `root`, then the `[files]` attributes.
pub fn apply(spec: &Spec, root: &Path) -> Result<usize> {
    let (env, ctx) = template_env(spec);
    let mut count = 0;
    for dir in &spec.overlays {
        count += apply_one(dir, root, &env, &ctx).with_context(|| format!("applying overlay {}", dir.display()))?;
    }
    apply_attrs(spec, root)?;
    Ok(count)
}

fn apply_one(dir: &Path, root: &Path, env: &minijinja::Environment, ctx: &minijinja::Value) -> Result<usize> {
    let mut count = 0;
    for e in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        let e = e.with_context(|| format!("reading overlay {}", dir.display()))?;
        let rel = e.path().strip_prefix(dir).expect("below overlay");
        let meta = e.path().symlink_metadata()?;
        let mode = meta.mode() & 0o7755;
        let ft = meta.file_type();
        if ft.is_dir() {
            let dest = resolve_in_root(root, rel)?;
            if !dest.is_dir() {
                fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
                set_owner_mode(&dest, 0, 0, mode)?;
            }
            continue;
        }
        let (rel, contents): (PathBuf, Option<Vec<u8>>) = match rel.to_str() {
            Some(s) if ft.is_file() && s.ends_with(".j2") => {
                let source =
                    fs::read_to_string(e.path()).with_context(|| format!("reading template {}", e.path().display()))?;
                let rendered = env.render_str(&source, ctx.clone()).map_err(|err| template_error(e.path(), &err))?;
                (PathBuf::from(&s[..s.len() - 3]), Some(rendered.into_bytes()))
            }
            _ => (rel.to_path_buf(), None),
        };
        let dest = resolve_in_root(root, &rel)?;
        if dest.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&dest).with_context(|| format!("replacing {}", dest.display()))?;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path())?, &dest)
                .with_context(|| format!("creating symlink {}", dest.display()))?;
        } else if ft.is_file() {
            match contents {
                Some(c) => fs::write(&dest, c),
                None => fs::copy(e.path(), &dest).map(|_| ()),
            }
            .with_context(|| format!("writing {}", dest.display()))?;
            set_owner_mode(&dest, 0, 0, mode)?;
        } else {
            bail!("{} is neither a file, a directory nor a symlink; overlays hold only those", e.path().display());
        }
        count += 1;
    }
    Ok(count)
}

fn template_error(path: &Path, err: &minijinja::Error) -> anyhow::Error {
    let line = err.line().map(|l| format!(":{l}")).unwrap_or_default();
    let detail = err.detail().map(|d| format!(" ({d})")).unwrap_or_default();
    anyhow!("rendering template {}{line}: {}{detail}", path.display(), err.kind())
}

fn set_owner_mode(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("setting owner of {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode of {}", path.display()))
}

/// Applies `[files]` modes and owners, looking names up in the image's own passwd/group.
fn apply_attrs(spec: &Spec, root: &Path) -> Result<()> {
    if spec.files.is_empty() {
        return Ok(());
    }
    let users = id_map(&root.join("etc/passwd"))?;
    let groups = id_map(&root.join("etc/group"))?;
    for (path, attrs) in &spec.files {
        let dest = resolve_in_root(root, Path::new(path.trim_start_matches('/')))?;
        let meta = dest
            .symlink_metadata()
            .with_context(|| format!("[files] names {path}, which no overlay or package provides"))?;
        let uid = match &attrs.owner {
            Some(u) => {
                *users.get(u).ok_or_else(|| anyhow!("[files] {path}: user {u:?} does not exist in the image"))?
            }
            None => meta.uid(),
        };
        let gid = match &attrs.group {
            Some(g) => {
                *groups.get(g).ok_or_else(|| anyhow!("[files] {path}: group {g:?} does not exist in the image"))?
            }
            None => meta.gid(),
        };
        let mode = match &attrs.mode {
            Some(m) => u32::from_str_radix(m, 8).expect("validated at load"),
            None => meta.mode() & 0o7777,
        };
        set_owner_mode(&dest, uid, gid, mode)?;
    }
    Ok(())
}

/// name → id from a passwd or group file.
pub fn id_map(file: &Path) -> Result<BTreeMap<String, u32>> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((name.to_string(), id))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn spec_with(overlays: Vec<PathBuf>) -> Spec {
        let mut spec: Spec = toml::from_str("name = \"t\"\n[base]\nsuite = \"bookworm\"\n").unwrap();
        spec.overlays = overlays;
        spec
    }

    #[test]
    fn copies_renders_and_keeps_modes() {
        let d = tempfile::tempdir().unwrap();
        let ov = d.path().join("ov");
        let root = d.path().join("root");
        fs::create_dir_all(ov.join("etc/labforge")).unwrap();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        fs::create_dir_all(ov.join("lib/systemd")).unwrap();
        fs::write(ov.join("lib/systemd/x.conf"), "x").unwrap();
        fs::write(ov.join("etc/labforge/motd.j2"), "image {{ spec.name }} root {{ spec.disk[\"root-size\"] }}\n")
            .unwrap();
        fs::write(ov.join("etc/run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(ov.join("etc/run.sh"), fs::Permissions::from_mode(0o777)).unwrap();
        symlink("/dev/null", ov.join("etc/masked.service")).unwrap();

        apply(&spec_with(vec![ov]), &root).unwrap();
        assert_eq!(fs::read_to_string(root.join("etc/labforge/motd")).unwrap(), "image t root 2GiB\n");
        assert!(!root.join("etc/labforge/motd.j2").exists());
        // Through the image's own /lib -> usr/lib link.
        assert_eq!(fs::read_to_string(root.join("usr/lib/systemd/x.conf")).unwrap(), "x");
        // Executable kept, group/world write dropped.
        assert_eq!(fs::metadata(root.join("etc/run.sh")).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(fs::read_link(root.join("etc/masked.service")).unwrap(), Path::new("/dev/null"));
    }

    #[test]
    fn containerds_sandbox_image_is_the_preloaded_pause() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays/base");
        let render = |refs: &[&str]| {
            let mut spec = spec_with(vec![base.clone()]);
            spec.preload = refs.iter().map(|r| crate::spec::Preload { reference: r.to_string() }).collect();
            let root = tempfile::tempdir().unwrap();
            apply(&spec, root.path()).unwrap();
            let text = fs::read_to_string(root.path().join("etc/containerd/config.toml")).unwrap();
            let conf: toml::Table = toml::from_str(&text).unwrap();
            conf["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"].as_str().unwrap().to_string()
        };
        assert_eq!(render(&[]), "registry.k8s.io/pause:3.10.2");
        assert_eq!(
            render(&["127.0.0.1:35124/k8s/kube-apiserver:v1.36.5", "127.0.0.1:35124/k8s/pause:3.10.2"]),
            "127.0.0.1:35124/k8s/pause:3.10.2"
        );
    }

    #[test]
    fn unknown_template_variable_names_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let ov = d.path().join("ov");
        fs::create_dir_all(&ov).unwrap();
        fs::write(ov.join("f.j2"), "ok\n{{ spec.nmae }}\n").unwrap();
        let err = apply(&spec_with(vec![ov.clone()]), &d.path().join("root")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("{}:2", ov.join("f.j2").display())), "{msg}");
        assert!(msg.contains("undefined"), "{msg}");
    }

    #[test]
    fn overlay_hash_sees_content_and_mode() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), "a").unwrap();
        let h1 = hash_overlays(&[d.path().to_path_buf()]).unwrap();
        fs::set_permissions(d.path().join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        let h2 = hash_overlays(&[d.path().to_path_buf()]).unwrap();
        fs::write(d.path().join("f"), "b").unwrap();
        let h3 = hash_overlays(&[d.path().to_path_buf()]).unwrap();
        assert!(h1 != h2 && h2 != h3);
    }
}
