//! Reading spec files: `extends` chains, path resolution, located errors, validation.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{Spec, SCHEMA_VERSION};

/// A problem with a spec, located as precisely as the input allows.
#[derive(Debug, thiserror::Error)]
pub struct SpecError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path, e.g. `disk.root-size` or `users[0].name`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl SpecError {
    fn whole_file(file: &Path, field: Option<&str>, message: impl Into<String>) -> Self {
        SpecError {
            file: file.to_path_buf(),
            line: None,
            column: None,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

/// One spec file as read from disk, kept with its text so errors can be located.
struct Layer {
    file: PathBuf,
    text: String,
    table: toml::Table,
}

impl Layer {
    fn error_at(&self, offset: usize, message: impl Into<String>) -> SpecError {
        let (line, column) = line_col(&self.text, offset);
        SpecError {
            file: self.file.clone(),
            line: Some(line),
            column: Some(column),
            field: key_path_at(&self.text, offset),
            message: message.into(),
        }
    }

    /// Locates a key given as a path such as `["overlays", "1"]`.
    fn error_at_key(&self, path: &[&str], message: impl Into<String>) -> SpecError {
        match span_of(&self.text, path) {
            Some(offset) => self.error_at(offset, message),
            None => SpecError::whole_file(&self.file, Some(&path.join(".")), message),
        }
    }
}

/// Loads, merges and validates the spec at `path` and everything it `extends`.
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let mut chain = Vec::new();
    let mut seen = BTreeSet::new();
    let mut next = Some(path.to_path_buf());
    while let Some(p) = next.take() {
        let abs = std::path::absolute(&p).unwrap_or(p.clone());
        if !seen.insert(abs.clone()) {
            return Err(SpecError::whole_file(
                &p,
                Some("extends"),
                "`extends` chain loops back to this file; remove one of the `extends` keys",
            ));
        }
        let layer = read_layer(&p)?;
        if let Some(parent) = layer.table.get("extends").and_then(|v| v.as_str()) {
            let dir = p.parent().unwrap_or(Path::new("."));
            let parent_path = dir.join(parent);
            if !parent_path.is_file() {
                return Err(
                    layer.error_at_key(&["extends"], format!("extended spec {} does not exist", parent_path.display()))
                );
            }
            next = Some(parent_path);
        }
        chain.push(layer);
    }

    // Merge from the root of the chain down to the file the user named.
    let mut merged = toml::Table::new();
    for layer in chain.iter().rev() {
        merge(&mut merged, layer.table.clone());
    }
    merged.remove("extends");
    let top = &chain[0];
    let spec: Spec = toml::Value::Table(merged).try_into().map_err(|e: toml::de::Error| {
        SpecError::whole_file(&top.file, None, format!("merging extended specs: {}", e.message()))
    })?;
    validate_merged(&spec, top)?;
    Ok(spec)
}

fn read_layer(path: &Path) -> Result<Layer, SpecError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| SpecError::whole_file(path, None, format!("reading spec: {e}")))?;
    let mut layer = Layer { file: path.to_path_buf(), text, table: toml::Table::new() };
    // Check this file on its own first: unknown keys and wrong types are reported with the
    // file, line and column where they were written.
    let own: Spec = match toml::from_str(&layer.text) {
        Ok(s) => s,
        Err(e) => {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            return Err(layer.error_at(offset, e.message().trim_end().to_string()));
        }
    };
    layer.table = toml::from_str(&layer.text).expect("already parsed as a spec");
    if let Some(v) = layer.table.get("schema-version").and_then(|v| v.as_integer()) {
        if v != i64::from(SCHEMA_VERSION) {
            return Err(layer.error_at_key(
                &["schema-version"],
                format!("unsupported schema version {v}; this labforge reads version {SCHEMA_VERSION}"),
            ));
        }
    }
    validate_layer(&own, &layer)?;
    resolve_paths(&mut layer)?;
    Ok(layer)
}

/// Makes the paths in one layer absolute, relative to the directory of the file naming them,
/// and checks that they exist.
fn resolve_paths(layer: &mut Layer) -> Result<(), SpecError> {
    let dir = std::path::absolute(layer.file.parent().unwrap_or(Path::new("."))).unwrap_or_else(|_| PathBuf::from("."));
    let mut problems = Vec::new();
    let mut fix = |value: &mut toml::Value, key: Vec<String>, want_dir: bool| {
        if let Some(s) = value.as_str() {
            let p = dir.join(s);
            let ok = if want_dir { p.is_dir() } else { p.is_file() };
            if !ok {
                let what = if want_dir { "directory" } else { "file" };
                problems.push((key, format!("{what} {} does not exist", p.display())));
            }
            *value = toml::Value::String(p.to_string_lossy().into_owned());
        }
    };
    if let Some(toml::Value::Array(overlays)) = layer.table.get_mut("overlays") {
        for (i, v) in overlays.iter_mut().enumerate() {
            fix(v, vec!["overlays".into(), i.to_string()], true);
        }
    }
    if let Some(toml::Value::Table(stack)) = layer.table.get_mut("stack") {
        if let Some(toml::Value::Array(site)) = stack.get_mut("site") {
            for (i, v) in site.iter_mut().enumerate() {
                fix(v, vec!["stack".into(), "site".into(), i.to_string()], true);
            }
        }
    }
    if let Some(v) = layer.table.get_mut("cluster-secret-file") {
        fix(v, vec!["cluster-secret-file".into()], false);
    }
    if let Some(toml::Value::Table(base)) = layer.table.get_mut("base") {
        if let Some(v) = base.get_mut("keyring") {
            // The default keyrings live on the host; a spec-named keyring is checked by
            // `labforge doctor`/the rootfs stage so that a spec can be planned on any host.
            if let Some(s) = v.as_str() {
                *v = toml::Value::String(dir.join(s).to_string_lossy().into_owned());
            }
        }
        if let Some(toml::Value::Array(repos)) = base.get_mut("repositories") {
            for (i, r) in repos.iter_mut().enumerate() {
                if let Some(k) = r.get_mut("key").filter(|k| k.is_str()) {
                    fix(k, vec!["base".into(), "repositories".into(), i.to_string(), "key".into()], false);
                }
            }
        }
    }
    if let Some((key, message)) = problems.into_iter().next() {
        let path: Vec<&str> = key.iter().map(String::as_str).collect();
        return Err(layer.error_at_key(&path, message));
    }
    Ok(())
}

/// Merges `child` over `base`: tables key by key, the lists `packages`, `pins`, `overlays`,
/// `users` (also `[[lab.users]]`), `preload` and `[[lab.projects]]` appended, everything else
/// replaced.
fn merge(base: &mut toml::Table, child: toml::Table) {
    merge_at(base, child, "")
}

fn merge_at(base: &mut toml::Table, child: toml::Table, at: &str) {
    for (k, v) in child {
        let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(c)) => merge_at(b, c, &path),
            (Some(toml::Value::Array(b)), toml::Value::Array(c))
                if matches!(
                    path.as_str(),
                    "packages" | "pins" | "overlays" | "users" | "preload" | "lab.projects" | "lab.users"
                ) =>
            {
                b.extend(c)
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Checks what only the merged spec can tell: required keys, and sizes that add up.
fn validate_merged(spec: &Spec, top: &Layer) -> Result<(), SpecError> {
    let missing = |field: &str, what: &str| {
        SpecError::whole_file(
            &top.file,
            Some(field),
            format!("{what} is required; set it in this spec or in the spec it extends"),
        )
    };
    if spec.name.is_empty() {
        return Err(missing("name", "an image name"));
    }
    if spec.base.suite.is_empty() {
        return Err(missing("base.suite", "the distribution suite (e.g. \"bookworm\")"));
    }
    // The roster as a whole (a site's spec may add users to the projects of the one it extends).
    if let Err(e) = spec.lab.validate() {
        return Err(top.error_at_key(&["lab"], format!("{e:#}")));
    }
    let k = &spec.kubernetes;
    if k.source == super::KubernetesSource::Binaries {
        let at = |key: &str, m: String| SpecError::whole_file(&top.file, Some(&format!("kubernetes.{key}")), m);
        if !valid_release(&k.version) {
            return Err(at(
                "version",
                format!("source = \"binaries\" needs the exact release, like \"v1.36.5\" (found {:?})", k.version),
            ));
        }
        if !valid_release(&k.cni_version) {
            return Err(at("cni-version", format!("expected a release like \"v1.10.0\" (found {:?})", k.cni_version)));
        }
        for (key, url) in [("binaries-url", &k.binaries_url), ("cni-url", &k.cni_url)] {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(at(key, format!("{url:?} is not an http(s) URL")));
            }
        }
        if let Some(p) = spec.packages.iter().find(|p| crate::build::kubebin::PROGRAMS.contains(&p.as_str())) {
            return Err(at(
                "source",
                format!("source = \"binaries\" installs {p} from the release files; remove it from `packages`"),
            ));
        }
    }
    let total = spec.disk.esp_size.bytes() + spec.disk.root_size.bytes() + spec.disk.state_size.bytes();
    if total > (2u64 << 40) {
        return Err(top.error_at_key(
            &["disk"],
            "partitions add up to more than 2TiB; an image this large cannot be flashed to a stick",
        ));
    }
    Ok(())
}

/// `v<major>.<minor>.<patch>`, optionally with a pre-release suffix (`v1.36.0-rc.1`).
fn valid_release(v: &str) -> bool {
    let Some(rest) = v.strip_prefix('v') else { return false };
    let core = rest.split_once('-').map(|(c, _)| c).unwrap_or(rest);
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// Checks the values one file sets, so an error points into the file that wrote the value.
fn validate_layer(spec: &Spec, layer: &Layer) -> Result<(), SpecError> {
    let invalid = |path: &[&str], message: String| layer.error_at_key(path, message);
    if !spec.name.is_empty() && !valid_name(&spec.name) {
        return Err(invalid(
            &["name"],
            format!("{:?} is not a valid image name: use 1-63 lowercase letters, digits and '-'", spec.name),
        ));
    }
    if let Err(e) = check_hostname_pattern(&spec.hostname) {
        return Err(invalid(&["hostname"], e));
    }
    if spec.disk.esp_size.as_mib() < 64 {
        return Err(invalid(
            &["disk", "esp-size"],
            format!(
                "{} is too small: the EFI system partition needs at least 64MiB for the kernel image",
                spec.disk.esp_size
            ),
        ));
    }
    if spec.disk.root_size.as_mib() < 512 {
        return Err(invalid(
            &["disk", "root-size"],
            format!("{} is too small: the root filesystem needs at least 512MiB", spec.disk.root_size),
        ));
    }
    if spec.disk.state_size.as_mib() < 32 {
        return Err(invalid(
            &["disk", "state-size"],
            format!("{} is too small: the state partition needs at least 32MiB", spec.disk.state_size),
        ));
    }
    let total = spec.disk.esp_size.bytes() + spec.disk.root_size.bytes() + spec.disk.state_size.bytes();
    if total > (2u64 << 40) {
        return Err(invalid(
            &["disk"],
            "partitions add up to more than 2TiB; an image this large cannot be flashed to a stick".into(),
        ));
    }
    for (i, r) in spec.base.repositories.iter().enumerate() {
        let idx = i.to_string();
        let at = |k: &str| vec!["base", "repositories", &idx, k].into_iter().map(String::from).collect::<Vec<_>>();
        let here = |k: &str, m: String| {
            let p = at(k);
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            invalid(&p, m)
        };
        match (&r.key, &r.key_url) {
            (Some(_), Some(_)) => return Err(here("key-url", "give either `key` or `key-url`, not both".into())),
            (None, None) => {
                return Err(here(
                    "uri",
                    format!(
                        "repository {} needs a signing key: set `key` (a file) or `key-url` with `key-fingerprint`",
                        r.uri
                    ),
                ))
            }
            (None, Some(_)) if r.key_fingerprint.is_none() => {
                return Err(here(
                    "key-url",
                    "a key fetched from a URL needs `key-fingerprint`, so a replaced key is refused".into(),
                ))
            }
            _ => {}
        }
        if let Some(fp) = &r.key_fingerprint {
            let clean: String = fp.chars().filter(|c| !c.is_whitespace()).collect();
            if clean.len() != 40 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(here(
                    "key-fingerprint",
                    format!("{fp:?} is not an OpenPGP v4 fingerprint (40 hex digits)"),
                ));
            }
        }
    }
    if let Err(e) = spec.cluster.validate() {
        return Err(invalid(&["cluster"], format!("{e:#}")));
    }
    if let Err(e) = spec.disks.validate() {
        return Err(invalid(&["disks"], format!("{e:#}")));
    }
    if let Err(e) = spec.install.validate() {
        return Err(invalid(&["install"], format!("{e:#}")));
    }
    if let Err(e) = spec.pxe.validate() {
        return Err(invalid(&["pxe"], format!("{e:#}")));
    }
    if let Err(e) = spec.network.validate(&spec.cluster.pod_cidr, &spec.cluster.service_cidr) {
        return Err(invalid(&["network"], format!("{e:#}")));
    }
    if spec.pxe.serve && !spec.outputs.contains(&crate::spec::OutputFormat::Pxe) {
        return Err(invalid(&["pxe", "serve"], "serving netboot needs the pxe output: add \"pxe\" to outputs".into()));
    }
    if spec.install.netboot && !spec.outputs.contains(&crate::spec::OutputFormat::Pxe) {
        return Err(invalid(
            &["install", "netboot"],
            "installing over the network needs the pxe output (nodes netboot it): add \"pxe\" to outputs".into(),
        ));
    }
    for (i, p) in spec.packages.iter().enumerate() {
        if !valid_package(p) {
            return Err(invalid(&["packages", &i.to_string()], format!("{p:?} is not a Debian package name")));
        }
    }
    for (i, pin) in spec.pins.iter().enumerate() {
        if let Some(p) = pin.packages.iter().find(|p| !valid_package(p)) {
            return Err(invalid(&["pins", &i.to_string(), "packages"], format!("{p:?} is not a Debian package name")));
        }
        if pin.packages.is_empty() || pin.version.trim().is_empty() {
            return Err(invalid(&["pins", &i.to_string()], "a pin needs at least one package and a version".into()));
        }
    }
    for (i, p) in spec.preload.iter().enumerate() {
        if let Err(e) = crate::registry::parse_reference(&p.reference) {
            return Err(invalid(&["preload", &i.to_string(), "ref"], format!("{e:#}")));
        }
    }
    if spec.outputs.is_empty() {
        return Err(invalid(&["outputs"], "at least one output format is needed".into()));
    }
    for (i, user) in spec.users.iter().enumerate() {
        let idx = i.to_string();
        if !valid_user_name(&user.name) {
            return Err(invalid(&["users", &idx, "name"], format!("{:?} is not a valid user name", user.name)));
        }
        if user.ssh_authorized_keys.is_empty() {
            return Err(invalid(
                &["users", &idx, "ssh-authorized-keys"],
                format!(
                    "user {:?} has no SSH key; images have no passwords, so every user needs at least one key",
                    user.name
                ),
            ));
        }
        for key in &user.ssh_authorized_keys {
            if !looks_like_ssh_key(key) {
                return Err(invalid(
                    &["users", &idx, "ssh-authorized-keys"],
                    format!("{key:?} is not an SSH public key (expected \"ssh-ed25519 AAAA...\" or similar)"),
                ));
            }
        }
    }
    for (path, attrs) in &spec.files {
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(invalid(
                &["files", path],
                format!("{path:?} must be an absolute path inside the image without '..'"),
            ));
        }
        if let Some(mode) = &attrs.mode {
            match u32::from_str_radix(mode, 8) {
                Ok(m) if m <= 0o7777 && m & 0o002 == 0 => {}
                Ok(_) => {
                    return Err(invalid(
                        &["files", path, "mode"],
                        format!(
                        "mode {mode} is world-writable or out of range; labforge images have no world-writable files"
                    ),
                    ))
                }
                Err(_) => {
                    return Err(invalid(
                        &["files", path, "mode"],
                        format!("mode {mode:?} is not an octal number such as \"0644\""),
                    ))
                }
            }
        }
    }
    Ok(())
}

fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Debian policy: lowercase letters, digits, `+ - .`, at least two characters, starting
/// alphanumeric.
fn valid_package(s: &str) -> bool {
    s.len() >= 2
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

fn valid_user_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && s != "root"
}

fn looks_like_ssh_key(s: &str) -> bool {
    let mut parts = s.split_whitespace();
    matches!(
        (parts.next(), parts.next()),
        (Some(kind), Some(blob)) if (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-")) && blob.starts_with("AAAA")
    )
}

/// Checks a hostname pattern: known placeholders only, and a valid hostname once rendered.
pub fn check_hostname_pattern(pattern: &str) -> Result<(), String> {
    let sample = labforge_core::config::render_hostname(pattern, "0123456789ab", "0123456789abcdef0123456789abcdef")
        .map_err(|e| format!("{e:#}"))?;
    if sample.len() > 63 || !valid_name(&sample) {
        return Err(format!(
            "pattern {pattern:?} renders to {sample:?}, which is not a valid hostname (1-63 lowercase letters, digits, '-')"
        ));
    }
    Ok(())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

/// Every key in the document with its byte offset and dotted path.
fn key_spans(text: &str) -> Vec<(usize, String)> {
    let Ok(doc) = text.parse::<toml_edit::ImDocument<String>>() else { return Vec::new() };
    let mut out = Vec::new();
    walk_table(doc.as_table(), "", &mut out);
    out.sort();
    out
}

fn walk_table(table: &toml_edit::Table, prefix: &str, out: &mut Vec<(usize, String)>) {
    for (k, item) in table.iter() {
        let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        if let Some(span) = table.key(k).and_then(|key| key.span()) {
            out.push((span.start, path.clone()));
        }
        walk_item(item, &path, out);
    }
}

fn walk_item(item: &toml_edit::Item, path: &str, out: &mut Vec<(usize, String)>) {
    match item {
        toml_edit::Item::Table(t) => walk_table(t, path, out),
        toml_edit::Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if let Some(span) = t.span() {
                    out.push((span.start, p.clone()));
                }
                walk_table(t, &p, out);
            }
        }
        toml_edit::Item::Value(v) => walk_value(v, path, out),
        toml_edit::Item::None => {}
    }
}

fn walk_value(v: &toml_edit::Value, path: &str, out: &mut Vec<(usize, String)>) {
    match v {
        toml_edit::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if let Some(span) = v.span() {
                    out.push((span.start, p.clone()));
                }
                walk_value(v, &p, out);
            }
        }
        toml_edit::Value::InlineTable(t) => {
            for (k, v) in t.iter() {
                let p = format!("{path}.{k}");
                if let Some(span) = t.key(k).and_then(|key| key.span()) {
                    out.push((span.start, p.clone()));
                }
                walk_value(v, &p, out);
            }
        }
        _ => {}
    }
}

/// The dotted path of the last key that starts at or before `offset`.
fn key_path_at(text: &str, offset: usize) -> Option<String> {
    key_spans(text).into_iter().rfind(|(start, _)| *start <= offset).map(|(_, p)| p)
}

/// The offset of the key at `path` (`["users", "0", "name"]` is `users[0].name`).
fn span_of(text: &str, path: &[&str]) -> Option<usize> {
    let mut want = String::new();
    for part in path {
        if part.chars().all(|c| c.is_ascii_digit()) {
            want.push_str(&format!("[{part}]"));
        } else {
            if !want.is_empty() {
                want.push('.');
            }
            want.push_str(part);
        }
    }
    key_spans(text).into_iter().find(|(_, p)| *p == want).map(|(o, _)| o)
}

#[cfg(test)]
mod tests;
