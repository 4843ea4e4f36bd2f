//! The notebook images the VM tests preload stand on their own: each, unpacked as a runtime
//! lays out its root file system, runs its programs chrooted as an unprivileged roster uid with
//! nothing from the host (no host Python, no venv, an empty environment but the image's own).
//! Everything the notebooks component asks of an image is tried here: the hub, the proxy, the
//! user's server, `lab-env`'s venv with the image's packages visible, the gateway and its
//! front's modules, the kernel with the launcher where the component looks for it, and the
//! shell tools the homes Job runs. Needs root (chroot).

use anyhow::Result;
use qemu_tests::notebook_images::{notebook_images, run_in, unpack};

const UID: u32 = 2001;

/// Counts the stale and the checked `.pyc` files of the image's Python trees.
const PYC_CHECK: &str = r#"
import importlib.util as u, os
from importlib._bootstrap_external import _classify_pyc, _validate_timestamp_pyc
stale = checked = 0
for top in ("/usr/lib/python3.11", "/usr/local/lib/python3.11/dist-packages"):
    for d, _, files in os.walk(top):
        for f in files:
            if not f.endswith(".py"):
                continue
            src = os.path.join(d, f)
            try:
                data = open(u.cache_from_source(src), "rb").read(16)
                st = os.stat(src)
            except OSError:
                continue
            checked += 1
            try:
                if _classify_pyc(data, f, {}) == 0:
                    _validate_timestamp_pyc(data, int(st.st_mtime), st.st_size, f, {})
            except ImportError:
                stale += 1
print(stale, checked)
"#;

#[test]
fn the_notebook_images_run_on_their_own() -> Result<()> {
    let images = notebook_images()?;
    let names: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "labforge-test/jupyterhub",
            "labforge-test/configurable-http-proxy",
            "labforge-test/singleuser",
            "labforge-test/enterprise-gateway",
            "labforge-test/kernel-py"
        ]
    );
    // One base layer, shared.
    assert!(images.iter().all(|i| i.layers.len() == 2 && i.layers[0] == images[0].layers[0]));
    let checks: [&[(&str, &str)]; 5] = [
        &[
            ("jupyterhub --version", "5.3.0"),
            ("python3 -c 'import kubespawner, kubernetes_asyncio, sqlalchemy; print(\"hub-ok\")'", "hub-ok"),
            // The hub finds its pages where it looks for them (a missing template is a 500).
            (
                "python3 -c 'from jupyterhub._data import DATA_FILES_PATH as d; import os; print(d, os.path.isfile(d + \"/templates/login.html\"))'",
                "/usr/local/share/jupyterhub True",
            ),
        ],
        &[("configurable-http-proxy --version", "4.6.3")],
        &[
            ("jupyterhub-singleuser --version", "5.3.0"),
            ("python3 -c 'import jupyter_server; print(jupyter_server.__version__)'", "2.21.1"),
            // lab-env: a venv in the home with the image's packages and Debian's pip.
            (
                "python3 -m venv --system-site-packages /tmp/h/.lab-envs/e1 && /tmp/h/.lab-envs/e1/bin/python -c 'import jupyter_server, pip; print(\"env-ok\")'",
                "env-ok",
            ),
            // The homes Job's shell and tools.
            ("mkdir -m 0700 /tmp/.new-a && mv /tmp/.new-a /tmp/a && ls -ld /tmp/a && id -u", "drwx------"),
        ],
        &[
            ("jupyter enterprisegateway --version", "3.3.0"),
            ("python3 -c 'import tornado, kubernetes; print(\"front-ok\")'", "front-ok"),
        ],
        &[
            (
                "python3 -c 'import ipykernel, Cryptodome; print(ipykernel.__version__)' && test -f /usr/local/bin/kernel-launchers/python/scripts/launch_ipykernel.py && echo launcher-ok",
                "launcher-ok",
            ),
            ("python3 -c 'import os; print(os.environ[\"HOME\"])'", "/home/jovyan"),
        ],
    ];
    for (image, checks) in images.iter().zip(checks) {
        let root = tempfile::tempdir()?;
        unpack(image, root.path())?;
        // The root file system is root's: the user cannot change the image's files.
        let meta = std::fs::metadata(root.path().join("usr/bin/python3.11"))?;
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
        for (cmd, expect) in checks {
            let out = run_in(root.path(), image, UID, cmd)?;
            assert!(out.contains(expect), "{}: `{cmd}` said {out:?}, not {expect:?}", image.name);
        }
        let refused = run_in(root.path(), image, UID, "echo x > /usr/bin/x");
        assert!(refused.is_err(), "{}: uid {UID} wrote into the image's /usr/bin", image.name);
        // No module is compiled again at start: every compiled module matches its source's
        // time and size (the layers kept them).
        let pycs = run_in(root.path(), image, UID, &format!("python3 -c '{PYC_CHECK}'"))?;
        let counts: Vec<usize> = pycs.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert!(counts.len() == 2 && counts[0] == 0 && counts[1] > 200, "{}: stale, checked: {pycs}", image.name);
    }
    Ok(())
}
