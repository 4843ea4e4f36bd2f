use super::*;
use rstest::rstest;
use std::fs;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

const MINIMAL: &str = "name = \"t\"\n[base]\nsuite = \"bookworm\"\n";

#[test]
fn minimal_spec_gets_defaults() {
    let d = tempfile::tempdir().unwrap();
    let spec = load(&write(d.path(), "s.toml", MINIMAL)).unwrap();
    assert_eq!(spec.name, "t");
    assert_eq!(spec.base.mirror(), "http://deb.debian.org/debian");
    assert_eq!(spec.base.components(), vec!["main"]);
    assert_eq!(spec.disk.root_size.as_mib(), 2048);
    assert!(spec.install_packages().contains(&"linux-image-amd64".to_string()));
}

#[rstest]
#[case::malformed("name = \"t\n", 1, None, "")]
#[case::unknown_top_key("name = \"t\"\ncolour = \"red\"\n", 2, Some("colour"), "unknown field")]
#[case::unknown_nested_key(
    "name = \"t\"\n[disk]\nroot-size = \"1GiB\"\nroot-sise = \"1GiB\"\n",
    4,
    Some("disk.root-sise"),
    "unknown field"
)]
#[case::impossible_size(
    "name = \"t\"\n[disk]\nroot-size = \"1.5MiB\"\n",
    3,
    Some("disk.root-size"),
    "whole number of MiB"
)]
#[case::unitless_size("name = \"t\"\n[disk]\nesp-size = \"64\"\n", 3, Some("disk.esp-size"), "unit is required")]
#[case::wrong_type("name = \"t\"\npackages = \"vim\"\n", 2, Some("packages"), "invalid type")]
#[case::bad_output("name = \"t\"\noutputs = [\"iso\"]\n", 2, Some("outputs[0]"), "unknown variant")]
#[case::bad_wipe("name = \"t\"\n[disks]\nwipe = \"all\"\n", 3, Some("disks.wipe"), "unknown variant")]
#[case::bad_size_range("name = \"t\"\n[disks.match]\nsize = \"1TB\"\n", 3, Some("disks.match.size"), "MIN..MAX")]
fn bad_files_are_located(#[case] text: &str, #[case] line: usize, #[case] field: Option<&str>, #[case] message: &str) {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "bad.toml", text);
    let err = load(&p).unwrap_err();
    assert_eq!(err.file, p);
    assert_eq!(err.line, Some(line), "{err}");
    assert!(err.column.is_some());
    if let Some(f) = field {
        assert_eq!(err.field.as_deref(), Some(f), "{err}");
    }
    assert!(err.message.contains(message), "{err}");
}

#[rstest]
#[case::small_root("[disk]\nroot-size = \"128MiB\"\n", "disk.root-size", "too small")]
#[case::small_esp("[disk]\nesp-size = \"32MiB\"\n", "disk.esp-size", "too small")]
#[case::bad_name("name = \"Lab PC\"\n", "name", "not a valid image name")]
#[case::bad_hostname("hostname = \"lab-{serial}\"\n", "hostname", "unknown placeholder")]
#[case::user_without_key(
    "[[users]]\nname = \"ada\"\nssh-authorized-keys = []\n",
    "users[0].ssh-authorized-keys",
    "no SSH key"
)]
#[case::not_a_key(
    "[[users]]\nname = \"ada\"\nssh-authorized-keys = [\"hunter2\"]\n",
    "users[0].ssh-authorized-keys",
    "not an SSH public key"
)]
#[case::world_writable("[files.\"/etc/x\"]\nmode = \"0666\"\n", "files./etc/x.mode", "world-writable")]
#[case::wrong_schema("schema-version = 2\n", "schema-version", "unsupported schema version")]
#[case::force_without_match("[disks]\nwipe = \"force\"\n", "disks", "needs a [disks.match]")]
#[case::force_everything(
    "[disks]\nwipe = \"force\"\n[disks.match]\nby-id = [\"/dev/disk/by-id/*\"]\n",
    "disks",
    "includes the OS disk"
)]
#[case::install_by_kernel_name("[install]\ntarget = \"/dev/sda\"\n", "install", "kernel names such as /dev/sda change")]
#[case::pxe_without_output("[pxe]\nserve = true\n", "pxe.serve", "add \"pxe\" to outputs")]
#[case::netinstall_without_output("[install]\nnetboot = true\n", "install.netboot", "add \"pxe\" to outputs")]
#[case::pxe_bad_range(
    "outputs = [\"raw\", \"pxe\"]\n[pxe]\nserve = true\ndhcp-range = \"10.0.0.9,10.0.0.1\"\n",
    "pxe",
    "ends before it starts"
)]
fn invalid_values_are_rejected(#[case] extra: &str, #[case] field: &str, #[case] message: &str) {
    let d = tempfile::tempdir().unwrap();
    let name = if extra.starts_with("name") { "" } else { "name = \"t\"\n" };
    let text = format!("{name}{extra}[base]\nsuite = \"bookworm\"\n");
    let err = load(&write(d.path(), "s.toml", &text)).unwrap_err();
    assert!(err.to_string().contains(message), "{err}");
    assert_eq!(err.field.as_deref(), Some(field), "{err}");
    assert!(err.line.is_some(), "{err}");
}

#[test]
fn the_pxe_output_brings_live_boot_dnsmasq_and_ipxe() {
    let d = tempfile::tempdir().unwrap();
    let spec = load(&write(d.path(), "s.toml", &format!("outputs = [\"raw\", \"pxe\"]\n{MINIMAL}"))).unwrap();
    let p = spec.install_packages();
    for want in ["live-boot", "dnsmasq-base", "ipxe"] {
        assert!(p.contains(&want.to_string()), "{want} in {p:?}");
    }
    assert!(!load(&write(d.path(), "s.toml", MINIMAL)).unwrap().install_packages().contains(&"live-boot".to_string()));
}

#[test]
fn missing_required_fields_name_the_field() {
    let d = tempfile::tempdir().unwrap();
    let err = load(&write(d.path(), "s.toml", "[base]\nsuite = \"bookworm\"\n")).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("name"));
    let err = load(&write(d.path(), "s.toml", "name = \"x\"\n")).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("base.suite"));
}

#[test]
fn missing_overlay_dir_is_located() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("present")).unwrap();
    let p =
        write(d.path(), "s.toml", "name = \"t\"\noverlays = [\"present\", \"absent\"]\n[base]\nsuite = \"bookworm\"\n");
    let err = load(&p).unwrap_err();
    assert_eq!(err.line, Some(2));
    assert_eq!(err.field.as_deref(), Some("overlays[1]"));
    assert!(err.message.contains("absent") && err.message.contains("does not exist"), "{err}");
}

#[test]
fn extends_merges_tables_and_appends_lists() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("base/ov")).unwrap();
    fs::create_dir_all(d.path().join("child/ov")).unwrap();
    write(
        &d.path().join("base"),
        "parent.toml",
        "name = \"parent\"\npackages = [\"vim\"]\noverlays = [\"ov\"]\n[base]\nsuite = \"bookworm\"\n[disk]\nroot-size = \"1GiB\"\n\
         [[lab.projects]]\nname = \"p1\"\ncpu-min = \"1\"\ncpu-max = \"1\"\nmemory-min = \"1Gi\"\nmemory-max = \"1Gi\"\n\
         [[lab.users]]\nname = \"alice\"\nuid = 2001\nprojects = [\"p1\"]\n",
    );
    let child = write(
        &d.path().join("child"),
        "child.toml",
        "extends = \"../base/parent.toml\"\nname = \"child\"\npackages = [\"git\"]\noverlays = [\"ov\"]\n[disk]\nstate-size = \"128MiB\"\n\
         [[lab.users]]\nname = \"bob\"\nuid = 2002\nprojects = [\"p1\"]\n",
    );
    let spec = load(&child).unwrap();
    assert_eq!(spec.name, "child");
    assert_eq!(spec.packages, vec!["vim", "git"]);
    assert_eq!(spec.disk.root_size.as_mib(), 1024);
    assert_eq!(spec.disk.state_size.as_mib(), 128);
    // The roster's lists are appended too: a site's spec adds its people to a shared one.
    let names: Vec<&str> = spec.lab.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(spec.lab.projects.len(), 1);
    // Each overlay is resolved relative to the file that named it.
    assert!(spec.overlays[0].ends_with("base/ov"), "{:?}", spec.overlays);
    assert!(spec.overlays[1].ends_with("child/ov"), "{:?}", spec.overlays);
}

#[test]
fn extends_loop_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.toml", "extends = \"b.toml\"\n");
    let b = write(d.path(), "b.toml", "extends = \"a.toml\"\n");
    let err = load(&b).unwrap_err();
    assert!(err.message.contains("loops"), "{err}");
}

#[test]
fn a_bad_value_in_the_parent_is_located_in_the_parent() {
    let d = tempfile::tempdir().unwrap();
    let parent =
        write(d.path(), "p.toml", "name = \"p\"\npackages = [\"vim\", \"Bad Name\"]\n[base]\nsuite = \"bookworm\"\n");
    let child = write(d.path(), "c.toml", "extends = \"p.toml\"\npackages = [\"git\"]\n");
    let err = load(&child).unwrap_err();
    assert_eq!(err.file, parent, "{err}");
    assert_eq!(err.field.as_deref(), Some("packages[1]"), "{err}");
}

#[test]
fn errors_in_an_extended_file_name_that_file() {
    let d = tempfile::tempdir().unwrap();
    let parent = write(d.path(), "p.toml", "name = \"p\"\nbogus = 1\n");
    let child = write(d.path(), "c.toml", "extends = \"p.toml\"\n");
    let err = load(&child).unwrap_err();
    assert_eq!(err.file, parent);
    assert_eq!(err.line, Some(2));
}

#[rstest]
#[case::no_version("[kubernetes]\nsource = \"binaries\"\n", "kubernetes.version", "exact release")]
#[case::loose_version(
    "[kubernetes]\nsource = \"binaries\"\nversion = \"1.36\"\n",
    "kubernetes.version",
    "exact release"
)]
#[case::bad_cni(
    "[kubernetes]\nsource = \"binaries\"\nversion = \"v1.36.5\"\ncni-version = \"latest\"\n",
    "kubernetes.cni-version",
    "expected a release"
)]
#[case::not_http(
    "[kubernetes]\nsource = \"binaries\"\nversion = \"v1.36.5\"\nbinaries-url = \"/srv/k8s\"\n",
    "kubernetes.binaries-url",
    "not an http(s) URL"
)]
#[case::twice(
    "packages = [\"kubeadm\"]\n[kubernetes]\nsource = \"binaries\"\nversion = \"v1.36.5\"\n",
    "kubernetes.source",
    "remove it from `packages`"
)]
fn kubernetes_from_binaries_needs_an_exact_release(#[case] text: &str, #[case] field: &str, #[case] message: &str) {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "k.toml", &format!("name = \"t\"\n{text}[base]\nsuite = \"bookworm\"\n"));
    let err = load(&p).unwrap_err();
    assert_eq!(err.field.as_deref(), Some(field), "{err}");
    assert!(err.message.contains(message), "{err}");
    let ok =
        write(d.path(), "ok.toml", &format!("{MINIMAL}[kubernetes]\nsource = \"binaries\"\nversion = \"v1.36.5\"\n"));
    let spec = load(&ok).unwrap();
    assert_eq!(spec.kubernetes.binaries_url, "https://dl.k8s.io/release");
    assert_eq!(spec.kubernetes.node().version, "v1.36.5");
}
