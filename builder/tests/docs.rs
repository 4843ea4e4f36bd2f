//! Docs that cannot drift: the README's spec reference table lists exactly the keys the spec
//! types accept, and the Makefile installs every host package `labforge doctor` knows.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// Dotted keys of the spec, from its JSON schema (`users[].name`, `files.<path>.mode`).
fn schema_keys() -> BTreeSet<String> {
    let schema = serde_json::to_value(schemars::schema_for!(labforge::spec::Spec)).unwrap();
    let defs = schema["definitions"].clone();
    let mut out = BTreeSet::new();
    walk(&schema, &defs, "", &mut out);
    out
}

fn resolve<'a>(v: &'a Value, defs: &'a Value) -> &'a Value {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        return resolve(&defs[r.trim_start_matches("#/definitions/")], defs);
    }
    for k in ["allOf", "anyOf"] {
        if let Some(list) = v.get(k).and_then(Value::as_array) {
            if let Some(obj) = list.iter().map(|x| resolve(x, defs)).find(|x| {
                x.get("properties").is_some()
                    || x.get("additionalProperties").is_some_and(Value::is_object)
                    || x.get("items").is_some()
            }) {
                return obj;
            }
        }
    }
    v
}

fn walk(v: &Value, defs: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let v = resolve(v, defs);
    if let Some(props) = v.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            out.insert(key.clone());
            let sub = resolve(sub, defs);
            if let Some(items) = sub.get("items") {
                walk(items, defs, &format!("{key}[]"), out);
            } else if let Some(ap) = sub.get("additionalProperties").filter(|a| a.is_object()) {
                walk(ap, defs, &format!("{key}.<path>"), out);
            } else {
                walk(sub, defs, &key, out);
            }
        }
    }
}

fn readme_keys() -> BTreeSet<String> {
    let text = readme();
    let start = text.find("<!-- spec-table -->").expect("README has the spec table markers");
    let end = text.find("<!-- /spec-table -->").expect("end marker");
    text[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.split('`').nth(1).unwrap().to_string())
        .collect()
}

#[test]
fn readme_spec_table_matches_the_spec_types() {
    let schema = schema_keys();
    let readme = readme_keys();
    let undocumented: Vec<_> = schema.difference(&readme).collect();
    let stale: Vec<_> = readme.difference(&schema).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "README spec table out of date.\nmissing: {undocumented:?}\nnot in the types: {stale:?}"
    );
    assert!(schema.contains("disk.root-size") && schema.contains("users[].ssh-authorized-keys"));
}

#[test]
fn makefile_installs_every_host_package_doctor_knows() {
    let makefile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Makefile")).unwrap();
    let line = makefile.lines().find(|l| l.starts_with("HOST_PACKAGES")).expect("HOST_PACKAGES in Makefile");
    for r in labforge::hostcheck::REQUIREMENTS {
        assert!(line.split_whitespace().any(|w| w == r.package), "Makefile HOST_PACKAGES lacks {}", r.package);
    }
}

#[test]
fn readme_quick_start_is_two_commands() {
    let text = readme();
    let start = text.find("## Quick start").expect("quick start section");
    let block = &text[start..];
    let code = block.split("```").nth(1).expect("code block");
    let cmds: Vec<&str> = code.lines().skip(1).filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(cmds, ["make demo", "make test"]);
}

#[test]
fn shipped_specs_parse_and_plan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let demo = labforge::spec::load(&root.join("images/demo.toml")).unwrap();
    assert_eq!(demo.base.suite, "bookworm");
    let lab = labforge::spec::load(&root.join("images/lab.toml")).unwrap();
    assert_eq!(lab.base.distro, labforge::spec::Distro::Ubuntu);
    assert_eq!(lab.base.suite, "noble");
    let plan = labforge::build::rootfs::RootfsPlan::new(&lab);
    // The Ubuntu archive keyring is present (make host-deps installs it).
    plan.preflight().unwrap();
    for p in ["kubeadm", "kubelet", "kubectl", "containerd", "lvm2", "linux-image-generic"] {
        assert!(
            plan.packages.iter().any(|x| x == p || x.starts_with(&format!("{p}="))),
            "lab image installs {p}: {:?}",
            plan.packages
        );
    }
    let k8s = plan.repositories.iter().find(|r| r.line.contains("pkgs.k8s.io")).expect("Kubernetes repository");
    assert_eq!(k8s.fingerprint.as_deref(), Some("DE15B14486CD377B9E876E1A234654DA9A296436"));
    assert!(matches!(&k8s.key, labforge::build::rootfs::KeySource::Url(u) if u.starts_with("https://pkgs.k8s.io/")));
    assert!(lab.pins.iter().any(|p| p.packages.contains(&"kubeadm".to_string()) && p.version.starts_with("1.3")));
    let cmd = plan.command(Path::new("rootfs.tar"), Path::new("/tmp"), &[]).display();
    assert!(cmd.contains(" noble ") && cmd.contains("ubuntu-archive-keyring.gpg"), "{cmd}");
    // The lab image carries the control-plane images of the Kubernetes version it runs, and the
    // sandbox image containerd is configured with.
    // (containerd's config is a template of the base overlay: render it as a build would.)
    let rendered = tempfile::tempdir().unwrap();
    labforge::build::overlays::apply(&lab, rendered.path()).unwrap();
    let sandbox = labforge::build::preload::sandbox_image(rendered.path());
    assert!(sandbox.ends_with("/pause:3.10.2"), "{sandbox}");
    let refs: Vec<&str> = lab.preload.iter().map(|p| p.reference.as_str()).collect();
    assert!(refs.contains(&sandbox.as_str()), "{sandbox} preloaded: {refs:?}");
    let v = &lab.kubernetes.version;
    for c in ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"] {
        assert!(refs.contains(&format!("registry.k8s.io/{c}:{v}").as_str()), "{c}:{v} preloaded: {refs:?}");
    }
    assert!(lab.pins.iter().any(|p| p.version.starts_with(v.trim_start_matches('v'))), "packages pinned to {v}");
}
