//! The stack stage: resolves `[stack]` against the built-in components (embedded from the
//! repository's `stack/` folder) and the site's own folders, adds every image they declare to the
//! preload set, renders every template with the values known at build time and proves the image
//! air-gapped: each image reference in a rendered object must be preloaded. The result is
//! `stack.json` in the image, which the master's agent applies.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use include_dir::{include_dir, Dir};
use labforge_core::stack::{
    self, images::images_in, ClusterFacts, ComponentSource, FetchedUpstream, ResolvedComponent, StackPlan,
};

use super::kubebin::{self, Pinned};
use crate::spec::{Spec, StackSpec};

/// The built-in components, as the repository's `stack/` folder held them at compile time.
static BUILTIN: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/../stack");

/// Every built-in component, by name.
pub fn builtin() -> Result<BTreeMap<String, ComponentSource>> {
    let mut out = BTreeMap::new();
    for dir in BUILTIN.dirs() {
        let files: BTreeMap<String, String> = dir
            .files()
            .filter_map(|f| {
                let name = f.path().file_name()?.to_string_lossy().into_owned();
                Some((name, f.contents_utf8()?.to_string()))
            })
            .collect();
        let origin = format!("stack/{}", dir.path().display());
        let c = ComponentSource::from_files(&origin, files)?;
        if c.file.name != dir.path().to_string_lossy() {
            bail!("{origin}: component.toml names it {:?}; the folder and the name must agree", c.file.name);
        }
        out.insert(c.file.name.clone(), c);
    }
    Ok(out)
}

/// The spec's components in the order they are applied, settings merged and image overrides
/// applied; `build-digest` is filled by [`check`].
pub fn resolve(spec: &StackSpec) -> Result<Vec<ResolvedComponent>> {
    if spec.components.is_empty() {
        if let Some(k) = spec.settings.keys().next() {
            bail!("[stack.{k}] sets a component that [stack] components does not list");
        }
        if let Some(k) = spec.images.keys().next() {
            bail!("[stack.images] {k:?} overrides an image of a component that [stack] components does not list");
        }
        return Ok(Vec::new());
    }
    let mut known = builtin()?;
    for dir in &spec.site {
        let c = ComponentSource::read_dir(dir).with_context(|| format!("[stack] site folder {}", dir.display()))?;
        if let Some(b) = known.get(&c.file.name) {
            bail!(
                "site component {} ({}) has the name of a {} component; rename it",
                c.file.name,
                dir.display(),
                if b.origin.starts_with("stack/") { "built-in" } else { "another site" }
            );
        }
        known.insert(c.file.name.clone(), c);
    }
    let mut chosen = Vec::new();
    for name in &spec.components {
        let Some(c) = known.get(name) else {
            let names: Vec<&str> = known.keys().map(String::as_str).collect();
            bail!(
                "[stack] components: no component {name:?} (known: {}; a site folder goes in [stack] site)",
                names.join(", ")
            );
        };
        if chosen.iter().any(|c: &&ComponentSource| &c.file.name == name) {
            bail!("[stack] components names {name} twice");
        }
        chosen.push(c);
    }
    for k in spec.settings.keys() {
        if !spec.components.contains(k) {
            bail!("[stack.{k}] sets a component that [stack] components does not list");
        }
    }
    let mut overrides: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for (k, v) in &spec.images {
        let Some((comp, key)) = k.split_once('.') else {
            bail!("[stack.images] {k:?}: write \"<component>.<image key>\"");
        };
        let Some(c) = chosen.iter().find(|c| c.file.name == comp) else {
            bail!("[stack.images] {k:?}: the stack runs no component {comp:?}");
        };
        if !c.file.images.contains_key(key) {
            let keys: Vec<&str> = c.file.images.keys().map(String::as_str).collect();
            bail!("[stack.images] {k:?}: component {comp} has no image {key:?} (its images: {})", keys.join(", "));
        }
        overrides.insert((comp, key), v.as_str());
    }
    for (k, url) in &spec.upstream {
        let Some((comp, file)) = k.split_once('.') else {
            bail!("[stack.upstream] {k:?}: write \"<component>.<upstream file>\"");
        };
        let Some(c) = chosen.iter().find(|c| c.file.name == comp) else {
            bail!("[stack.upstream] {k:?}: the stack runs no component {comp:?}");
        };
        if !c.file.upstream.iter().any(|u| u.name == file) {
            let names: Vec<&str> = c.file.upstream.iter().map(|u| u.name.as_str()).collect();
            bail!(
                "[stack.upstream] {k:?}: component {comp} has no upstream file {file:?} (its files: {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            );
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("[stack.upstream] {k:?}: {url:?} is not an http(s) URL");
        }
    }
    let order = stack::dependency_order(
        &chosen.iter().map(|c| (c.file.name.clone(), c.file.depends_on.clone())).collect::<Vec<_>>(),
    )?;
    order
        .iter()
        .map(|name| {
            let c = chosen.iter().find(|c| &c.file.name == name).expect("ordered from chosen");
            let settings = stack::merge_settings(&c.file, spec.settings.get(name).unwrap_or(&toml::Table::new()))
                .with_context(|| format!("[stack.{name}]"))?;
            let images = c
                .file
                .images
                .iter()
                .filter(|(k, _)| stack::enabled(&settings, c.file.image_when.get(*k).map(String::as_str)))
                .map(|(k, v)| {
                    (k.clone(), overrides.get(&(name.as_str(), k.as_str())).map_or(v.clone(), |o| o.to_string()))
                })
                .collect();
            let web = c.file.web.iter().filter(|w| stack::enabled(&settings, w.when.as_deref())).cloned().collect();
            let secrets =
                c.file.secrets.iter().filter(|s| stack::enabled(&settings, s.when.as_deref())).cloned().collect();
            let upstream = c
                .file
                .upstream
                .iter()
                .map(|u| FetchedUpstream {
                    name: u.name.clone(),
                    url: spec.upstream.get(&format!("{name}.{}", u.name)).unwrap_or(&u.url).clone(),
                    sha256: u.sha256.clone(),
                    text: String::new(),
                })
                .collect();
            let upstream_images = c
                .file
                .images
                .iter()
                .filter_map(|(k, default)| {
                    let o = overrides.get(&(name.as_str(), k.as_str()))?;
                    (*o != default).then(|| (default.clone(), o.to_string()))
                })
                .collect();
            Ok(ResolvedComponent {
                name: name.clone(),
                namespace: c.file.namespace.clone(),
                depends_on: c.file.depends_on.clone(),
                images,
                image_carrying: c.file.image_carrying.clone(),
                settings,
                ready: c.file.ready.clone(),
                web,
                secrets,
                templates: c.templates.clone(),
                upstream,
                upstream_images,
                origin: if c.origin.starts_with("stack/") { "built-in".into() } else { c.origin.clone() },
                build_digest: String::new(),
            })
        })
        .collect()
}

/// The components' upstream files as pinned downloads (`<component>.<file>`).
pub fn upstream_pins(components: &[ResolvedComponent]) -> Vec<Pinned> {
    components.iter().flat_map(|c| c.upstream.iter().map(|u| pin(&c.name, u))).collect()
}

fn pin(component: &str, u: &FetchedUpstream) -> Pinned {
    Pinned {
        name: format!("{}{component}.{}", kubebin::UPSTREAM_FILE, u.name),
        url: u.url.clone(),
        sha256: u.sha256.clone(),
    }
}

/// Fetches every upstream file into the cache (by sha256; verified while it streams, a file that
/// hashes otherwise fails the build naming it and is not kept) and puts its text in the
/// component. `offline`: only what the cache holds; the rest keeps no text (a plan then shows
/// it as not cached, and renders the component without its objects).
pub fn fetch_upstream(components: &mut [ResolvedComponent], cache: &Path, offline: bool) -> Result<()> {
    for c in components.iter_mut() {
        let name = c.name.clone();
        for u in c.upstream.iter_mut() {
            let pin = pin(&name, u);
            let path = if offline {
                match kubebin::cached(&pin, cache) {
                    Some(p) => p,
                    None => continue,
                }
            } else {
                kubebin::fetch_all(std::slice::from_ref(&pin), cache)?.remove(0)
            };
            u.text = std::fs::read_to_string(&path)
                .with_context(|| format!("{} ({}) is not UTF-8 text", pin.name, pin.url))?;
        }
    }
    Ok(())
}

/// Every image the components declare, in order, without repeats.
pub fn declared_images(components: &[ResolvedComponent]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in components {
        for r in c.images.values() {
            if !out.contains(r) {
                out.push(r.clone());
            }
        }
    }
    out
}

/// The facts templates see at build time.
pub fn build_facts(spec: &Spec) -> Result<ClusterFacts> {
    let mut facts =
        ClusterFacts::at_build(&spec.cluster.pod_cidr, &spec.cluster.service_cidr, &spec.kubernetes.version);
    facts.components = spec.stack.components.clone();
    facts.lab = spec.lab.view().context("[lab]")?;
    Ok(facts)
}

/// Renders every component and checks every image reference against the preload set (each a
/// reference with the digest it was pinned to; an unresolved one counts by name). Fills each
/// component's `build-digest`.
pub fn check(components: &mut [ResolvedComponent], facts: &ClusterFacts, preloaded: &[(String, String)]) -> Result<()> {
    check_with(components, facts, preloaded, false)
}

/// The same check before any registry is asked (tags not yet pinned): a reference by digest is
/// left for [`check`], every other one must be preloaded by name. A stack that cannot be
/// air-gapped fails before anything is downloaded.
pub fn check_names(components: &mut [ResolvedComponent], facts: &ClusterFacts, preload: &[String]) -> Result<()> {
    let named: Vec<(String, String)> = preload.iter().map(|r| (r.clone(), String::new())).collect();
    check_with(components, facts, &named, true)
}

fn check_with(
    components: &mut [ResolvedComponent],
    facts: &ClusterFacts,
    preloaded: &[(String, String)],
    names_only: bool,
) -> Result<()> {
    let mut owners: BTreeMap<(String, String, Option<String>, String), String> = BTreeMap::new();
    for c in components.iter_mut() {
        let r = stack::render(c, facts)?;
        for o in &r.objects {
            let id = stack::ObjectRef::of(o)?;
            let key = (id.group_version().0.to_string(), id.kind.clone(), id.namespace.clone(), id.name.clone());
            if let Some(other) = owners.insert(key, c.name.clone()) {
                bail!("{id} is in component {other} and in component {}: each object belongs to one component", c.name);
            }
            for f in images_in(o, &c.image_carrying) {
                if f.pull_policy.as_deref() == Some("Always") {
                    bail!(
                        "component {}: {} field {} pulls image {} always (imagePullPolicy: Always); a lab node has no registry: use IfNotPresent",
                        c.name, f.object, f.field, f.reference
                    );
                }
                let untagged = matches!(stack::images::split(&f.reference), (_, None, None));
                if untagged && f.pull_policy.is_none() {
                    bail!(
                        "component {}: {} field {} names image {} without a tag, which Kubernetes pulls always; give it a tag or a digest",
                        c.name, f.object, f.field, f.reference
                    );
                }
                if names_only && f.reference.contains('@') {
                    continue;
                }
                if !stack::images::covered(&f.reference, preloaded) {
                    bail!(
                        "component {}: {} field {} uses image {} which the image does not preload; declare it in the component's [images] (or add it to [[preload]]) — a lab node has no registry to pull it from",
                        c.name, f.object, f.field, f.reference
                    );
                }
            }
        }
        c.build_digest = r.digest;
    }
    Ok(())
}

/// Writes `stack.json` into the image (world-readable: it holds no secret).
pub fn install(root: &Path, components: &[ResolvedComponent], lab: &labforge_core::lab::Lab) -> Result<()> {
    let path = root.join(stack::STACK_PLAN.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let plan = StackPlan { components: components.to_vec(), lab: lab.clone() };
    std::fs::write(&path, serde_json::to_vec_pretty(&plan)?).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> StackSpec {
        toml::from_str(text).expect("a [stack] table")
    }

    fn pinned(refs: &[String]) -> Vec<(String, String)> {
        refs.iter().map(|r| (r.clone(), "sha256:00".into())).collect()
    }

    #[test]
    fn projects_render_a_namespace_limits_and_a_total_per_project_of_the_roster() {
        let lab: labforge_core::lab::Lab = toml::from_str(
            r#"
            [[projects]]
            name = "p1"
            cpu-min = "500m"
            cpu-max = "1"
            memory-min = "256Mi"
            memory-max = "512Mi"
            quota-memory = "2Gi"
            [[projects]]
            name = "p2"
            cpu-min = "1"
            cpu-max = "2"
            memory-min = "1Gi"
            memory-max = "2Gi"
            [[users]]
            name = "alice"
            uid = 2001
            projects = ["p1", "p2"]
            "#,
        )
        .unwrap();
        let mut cs =
            resolve(&spec("components = [\"projects\"]\n[projects]\npod_security = \"restricted\"\n")).unwrap();
        assert!(declared_images(&cs).is_empty(), "it runs nothing");
        let mut facts = ClusterFacts::at_build("a", "b", "c");
        check(&mut cs, &facts, &[]).unwrap();
        let none = stack::render(&cs[0], &facts).unwrap();
        assert!(none.objects.is_empty(), "no roster, no projects: {:?}", none.objects);
        facts.lab = lab.view().unwrap();
        let r = stack::render(&cs[0], &facts).unwrap();
        let kinds: Vec<String> = r.refs().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace lab-p1",
                "LimitRange lab-p1/project-limits",
                "ResourceQuota lab-p1/project-total",
                "Namespace lab-p2",
                "LimitRange lab-p2/project-limits",
            ]
        );
        let ns = &r.objects[0]["metadata"]["labels"];
        assert_eq!(ns["labforge.io/project"], "p1");
        assert_eq!(ns["pod-security.kubernetes.io/enforce"], "restricted");
        let limits = &r.objects[1]["spec"]["limits"][0];
        assert_eq!(limits["type"], "Container");
        assert_eq!(limits["max"], serde_json::json!({"cpu": "1000m", "memory": "536870912"}));
        assert_eq!(limits["min"], serde_json::json!({"cpu": "500m", "memory": "268435456"}));
        assert_eq!(limits["default"], limits["max"], "a kernel asking for nothing gets the maximum");
        assert_eq!(limits["defaultRequest"], limits["min"]);
        assert_eq!(r.objects[2]["spec"]["hard"], serde_json::json!({"limits.memory": "2147483648"}));
    }

    #[test]
    fn built_in_storage_renders_and_is_air_gapped_with_its_declared_images() {
        let mut cs = resolve(&spec("components = [\"storage\"]\n[storage]\npath = \"/srv/volumes\"\n")).unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].settings["path"].as_str(), Some("/srv/volumes"));
        let images = declared_images(&cs);
        assert_eq!(images.len(), 2, "{images:?}");
        check(&mut cs, &ClusterFacts::at_build("10.244.0.0/16", "10.96.0.0/12", "v1.36.5"), &pinned(&images)).unwrap();
        assert_eq!(cs[0].build_digest.len(), 64);
        let r = stack::render(&cs[0], &ClusterFacts::at_build("a", "b", "c")).unwrap();
        let class = r.objects.iter().find(|o| o["kind"] == "StorageClass").expect("a StorageClass");
        assert_eq!(class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"], "true");
        let cm = r.objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        assert!(cm["data"]["config.json"].as_str().unwrap().contains("/srv/volumes"));
    }

    #[test]
    fn an_image_outside_the_preload_set_fails_naming_component_object_and_field() {
        let mut cs = resolve(&spec("components = [\"storage\"]\n")).unwrap();
        let mut images = declared_images(&cs);
        // The helper image is named only in the ConfigMap's pod template.
        images.retain(|r| !r.contains("busybox"));
        let e = check(&mut cs, &ClusterFacts::at_build("a", "b", "c"), &pinned(&images)).unwrap_err().to_string();
        assert!(e.contains("component storage"), "{e}");
        assert!(e.contains("ConfigMap labforge-storage/local-path-config"), "{e}");
        assert!(e.contains("data[helperPod.yaml].spec.containers[0].image"), "{e}");
        assert!(e.contains("busybox:1.37"), "{e}");
    }

    #[test]
    fn image_overrides_settings_and_names_are_checked() {
        let cs = resolve(&spec(
            "components = [\"storage\"]\n[images]\n\"storage.provisioner\" = \"127.0.0.1:5000/lpp:v0.0.30\"\n",
        ))
        .unwrap();
        assert_eq!(cs[0].images["provisioner"], "127.0.0.1:5000/lpp:v0.0.30");
        let e = resolve(&spec("components = [\"storage\"]\n[images]\n\"storage.nope\" = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("has no image \"nope\" (its images: helper, provisioner)"), "{e}");
        let e = resolve(&spec("components = [\"storag\"]\n")).unwrap_err();
        assert!(
            e.to_string()
                .contains("no component \"storag\" (known: monitoring, notebooks, projects, rook-ceph, storage"),
            "{e}"
        );
        let e = resolve(&spec("components = [\"storage\"]\n[monitoring]\nretention = \"1d\"\n")).unwrap_err();
        assert!(e.to_string().contains("[stack.monitoring] sets a component"), "{e}");
        let e = format!("{:#}", resolve(&spec("components = [\"storage\"]\n[storage]\npaht = \"/x\"\n")).unwrap_err());
        assert!(e.contains("no setting \"paht\""), "{e}");
    }

    #[test]
    fn site_components_are_ordered_after_their_dependencies_and_rendered_too() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("wiki");
        std::fs::create_dir(&site).unwrap();
        std::fs::write(
            site.join("component.toml"),
            "name = \"wiki\"\nnamespace = \"wiki\"\ndepends-on = [\"storage\"]\n[images]\nweb = \"registry.lab/wiki:1\"\n",
        )
        .unwrap();
        std::fs::write(
            site.join("app.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: wiki\nspec:\n  template:\n    spec:\n      containers:\n        - name: w\n          image: {{ images.web }}\n",
        )
        .unwrap();
        let s = StackSpec { site: vec![site.clone()], ..spec("components = [\"wiki\", \"storage\"]\n") };
        let mut cs = resolve(&s).unwrap();
        assert_eq!(cs.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["storage", "wiki"]);
        assert_eq!(cs[1].origin, site.display().to_string());
        let images = declared_images(&cs);
        check(&mut cs, &ClusterFacts::at_build("a", "b", "c"), &pinned(&images)).unwrap();
        // A template that names an undeclared image fails the build.
        std::fs::write(site.join("extra.yaml"), "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n    - name: x\n      image: elsewhere/x:1\n").unwrap();
        let mut cs = resolve(&s).unwrap();
        let e = check(&mut cs, &ClusterFacts::at_build("a", "b", "c"), &pinned(&images)).unwrap_err();
        assert!(
            e.to_string().contains("component wiki: Pod p field spec.containers[0].image uses image elsewhere/x:1"),
            "{e}"
        );
        // A site folder may not take a built-in name.
        std::fs::write(site.join("component.toml"), "name = \"storage\"\nnamespace = \"x\"\n").unwrap();
        let e = resolve(&s).unwrap_err();
        assert!(e.to_string().contains("has the name of a built-in component"), "{e}");
    }

    fn configmap<'a>(r: &'a stack::Rendered, name: &str) -> &'a serde_json::Value {
        r.objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("ConfigMap {name}"))
    }

    #[test]
    fn monitoring_renders_prometheus_config_rules_and_grafana_provisioning_that_parse() {
        let mut cs =
            resolve(&spec("components = [\"monitoring\", \"storage\"]\n[monitoring]\nretention = \"30d\"\n")).unwrap();
        assert_eq!(cs.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["storage", "monitoring"]);
        let images = declared_images(&cs);
        check(&mut cs, &ClusterFacts::at_build("a", "b", "c"), &pinned(&images)).unwrap();
        let m = &cs[1];
        assert_eq!(
            m.web.iter().map(|w| (w.title.as_str(), w.port)).collect::<Vec<_>>(),
            [("Prometheus", 30090), ("Grafana", 30300)]
        );
        assert_eq!(m.secrets[0].name, "grafana-admin");
        let r = stack::render(m, &ClusterFacts::at_build("a", "b", "c")).unwrap();
        let cm = configmap(&r, "prometheus-config");
        let prom: serde_json::Value = serde_yaml_ng::from_str(cm["data"]["prometheus.yml"].as_str().unwrap()).unwrap();
        let jobs: Vec<&str> =
            prom["scrape_configs"].as_array().unwrap().iter().map(|j| j["job_name"].as_str().unwrap()).collect();
        assert_eq!(
            jobs,
            ["prometheus", "kubelet", "cadvisor", "node-exporter", "labforge-agent", "kube-state-metrics"]
        );
        assert_eq!(
            prom["scrape_configs"][5]["static_configs"][0]["targets"][0],
            "kube-state-metrics.labforge-monitoring.svc:8080"
        );
        let ksm = r
            .objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "kube-state-metrics")
            .unwrap();
        assert_eq!(ksm["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
        let agent = &prom["scrape_configs"][4];
        assert_eq!(agent["relabel_configs"][0]["replacement"], "${1}:9743", "the agents' /metrics port");
        assert_eq!(agent["http_sd_configs"][0]["url"], "http://192.0.2.1:9743/sd/nodes", "the master lists the nodes");
        assert_eq!(prom["scrape_configs"][2]["metrics_path"], "/metrics/cadvisor");
        assert_eq!(prom["scrape_configs"][1]["scheme"], "https");
        let rules: serde_json::Value = serde_yaml_ng::from_str(cm["data"]["rules.yml"].as_str().unwrap()).unwrap();
        let alerts: Vec<&str> =
            rules["groups"][0]["rules"].as_array().unwrap().iter().map(|r| r["alert"].as_str().unwrap()).collect();
        for a in ["NodeDown", "DiskFilling", "StackComponentNotReady", "AgentStuck"] {
            assert!(alerts.contains(&a), "{alerts:?}");
        }
        let node_down = &rules["groups"][0]["rules"][0];
        assert_eq!(
            node_down["annotations"]["summary"].as_str().unwrap().split(' ').nth(1),
            Some("{{"),
            "Prometheus templating kept"
        );
        let dep =
            r.objects.iter().find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "prometheus").unwrap();
        let args = dep["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap();
        assert!(args.iter().any(|a| a == "--storage.tsdb.retention.time=30d"), "{args:?}");
        assert_eq!(
            dep["spec"]["template"]["metadata"]["annotations"]["labforge.io/config-sha256"].as_str().unwrap().len(),
            64
        );
        // Grafana's provisioning files: the data source points at the Prometheus service, the
        // provider at the folder the dashboard ConfigMap is mounted on, and the dashboard is JSON.
        let prov = configmap(&r, "grafana-provisioning");
        let ds: serde_json::Value =
            serde_yaml_ng::from_str(prov["data"]["datasources.yaml"].as_str().unwrap()).unwrap();
        assert_eq!(ds["datasources"][0]["url"], "http://prometheus.labforge-monitoring.svc:9090");
        assert_eq!(ds["datasources"][0]["uid"], "prometheus");
        let providers: serde_json::Value =
            serde_yaml_ng::from_str(prov["data"]["dashboards.yaml"].as_str().unwrap()).unwrap();
        let path = providers["providers"][0]["options"]["path"].as_str().unwrap();
        let grafana =
            r.objects.iter().find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "grafana").unwrap();
        let mounts = grafana["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["mountPath"] == path && m["name"] == "dashboards"), "{mounts:?}");
        let dash: serde_json::Value =
            serde_json::from_str(configmap(&r, "grafana-dashboards")["data"]["cluster.json"].as_str().unwrap())
                .unwrap();
        assert_eq!(dash["uid"], "labforge-cluster");
        for p in dash["panels"].as_array().unwrap() {
            assert_eq!(p["datasource"]["uid"], "prometheus", "every panel uses the provisioned data source");
        }
        let env = grafana["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap();
        let password = env.iter().find(|e| e["name"] == "GF_SECURITY_ADMIN_PASSWORD").unwrap();
        assert_eq!(password["valueFrom"]["secretKeyRef"]["name"], "grafana-admin", "no default password");
    }

    #[test]
    fn monitoring_without_grafana_neither_preloads_nor_renders_it() {
        let cs = resolve(&spec("components = [\"storage\", \"monitoring\"]\n[monitoring]\ngrafana = false\n")).unwrap();
        let images = declared_images(&cs);
        assert!(!images.iter().any(|i| i.contains("grafana")), "{images:?}");
        assert!(cs[1].web.iter().all(|w| w.title != "Grafana"));
        assert!(cs[1].secrets.is_empty());
        let r = stack::render(&cs[1], &ClusterFacts::at_build("a", "b", "c")).unwrap();
        assert!(!r.objects.iter().any(|o| o["metadata"]["name"].as_str().unwrap_or_default().starts_with("grafana")));
        // Nor kube-state-metrics when it is off: no image, no objects, no scrape job.
        let cs =
            resolve(&spec("components = [\"storage\", \"monitoring\"]\n[monitoring]\nkube_state_metrics = false\n"))
                .unwrap();
        assert!(!declared_images(&cs).iter().any(|i| i.contains("kube-state-metrics")));
        let r = stack::render(&cs[1], &ClusterFacts::at_build("a", "b", "c")).unwrap();
        assert!(!r
            .objects
            .iter()
            .any(|o| o["metadata"]["name"].as_str().unwrap_or_default().contains("kube-state-metrics")));
        assert!(!configmap(&r, "prometheus-config")["data"]["prometheus.yml"]
            .as_str()
            .unwrap()
            .contains("kube-state-metrics"));
    }

    fn site(dir: &Path, name: &str, yaml: &str) -> std::path::PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("component.toml"), format!("name = \"{name}\"\nnamespace = \"{name}\"\n")).unwrap();
        std::fs::write(d.join("a.yaml"), yaml).unwrap();
        d
    }

    #[test]
    fn pulls_at_run_time_and_objects_of_two_components_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |image: &str, policy: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: x\nspec:\n  containers:\n    - name: c\n      image: {image}\n{policy}")
        };
        let facts = ClusterFacts::at_build("a", "b", "c");
        let preload = pinned(&["registry.lab/x:1".to_string(), "registry.lab/x".to_string()]);
        let run = |yaml: &str| {
            let s = StackSpec { site: vec![site(dir.path(), "a", yaml)], ..spec("components = [\"a\"]\n") };
            let mut cs = resolve(&s).unwrap();
            check(&mut cs, &facts, &preload).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(run(&pod("registry.lab/x:1", "      imagePullPolicy: IfNotPresent\n")).is_ok());
        let e = run(&pod("registry.lab/x:1", "      imagePullPolicy: Always\n")).unwrap_err();
        assert!(e.contains("imagePullPolicy: Always"), "{e}");
        let e = run(&pod("registry.lab/x", "")).unwrap_err();
        assert!(e.contains("without a tag"), "{e}");
        // The same object in two components.
        let s = StackSpec {
            site: vec![
                site(dir.path(), "one", &pod("registry.lab/x:1", "")),
                site(dir.path(), "two", &pod("registry.lab/x:1", "")),
            ],
            ..spec("components = [\"one\", \"two\"]\n")
        };
        let mut cs = resolve(&s).unwrap();
        let e = check(&mut cs, &facts, &preload).unwrap_err().to_string();
        assert!(e.contains("Pod x/p is in component one and in component two"), "{e}");
    }

    fn find<'a>(r: &'a stack::Rendered, kind: &str, name: &str) -> &'a serde_json::Value {
        r.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"))
    }

    #[test]
    fn rook_ceph_lists_only_offered_disks_sizes_pools_by_them_and_is_air_gapped() {
        let mut cs = resolve(&spec("components = [\"rook-ceph\"]\n")).unwrap();
        let c = &cs[0];
        assert_eq!(
            c.upstream.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
            ["crds", "common", "csi-operator"],
            "Rook's own files, fetched at build time"
        );
        assert!(c.upstream.iter().all(|u| u.url.contains("/rook/rook/v1.18.8/") && u.sha256.len() == 64));
        let images = declared_images(&cs);
        check(&mut cs, &ClusterFacts::at_build("a", "b", "c"), &pinned(&images)).unwrap();
        // At build time no node offers a disk: the cluster names none, pools keep one copy.
        let r = stack::render(&cs[0], &ClusterFacts::at_build("a", "b", "c")).unwrap();
        let cluster = find(&r, "CephCluster", "rook-ceph");
        assert_eq!(cluster["spec"]["storage"]["nodes"], serde_json::json!([]));
        assert_eq!(cluster["spec"]["storage"]["useAllDevices"], false);
        assert_eq!(find(&r, "CephBlockPool", "replicapool")["spec"]["replicated"]["size"], 1);
        // On the master: two nodes offer disks (a third offers none), three nodes in all.
        let mut facts = ClusterFacts::at_build("a", "b", "c");
        facts.nodes = 3;
        facts.ceph_devices.insert("lab-a".into(), vec!["/dev/disk/by-id/wwn-1".into(), "/dev/disk/by-id/wwn-2".into()]);
        facts.ceph_devices.insert("lab-b".into(), vec!["/dev/disk/by-id/ata-X".into()]);
        let r = stack::render(&cs[0], &facts).unwrap();
        let cluster = find(&r, "CephCluster", "rook-ceph");
        assert_eq!(
            cluster["spec"]["storage"]["nodes"],
            serde_json::json!([
                {"name": "lab-a", "devices": [{"name": "/dev/disk/by-id/wwn-1"}, {"name": "/dev/disk/by-id/wwn-2"}]},
                {"name": "lab-b", "devices": [{"name": "/dev/disk/by-id/ata-X"}]},
            ])
        );
        assert_eq!(cluster["spec"]["mon"]["count"], 3);
        assert_eq!(cluster["spec"]["cephVersion"]["image"], "quay.io/ceph/ceph:v19.2.3");
        let pool = find(&r, "CephBlockPool", "replicapool");
        assert_eq!(pool["spec"]["replicated"]["size"], 2, "two hosts offer disks: two copies");
        assert_eq!(pool["spec"]["replicated"]["requireSafeReplicaSize"], true);
        let fs = find(&r, "CephFilesystem", "labfs");
        assert_eq!(fs["spec"]["dataPools"][0]["replicated"]["size"], 2);
        let block = find(&r, "StorageClass", "rook-ceph-block");
        assert_eq!(block["provisioner"], "rook-ceph.rbd.csi.ceph.com");
        assert_eq!(block["parameters"]["pool"], "replicapool");
        assert!(block["metadata"].get("annotations").is_none(), "local-path stays the default class");
        let cephfs = find(&r, "StorageClass", "rook-cephfs");
        assert_eq!(cephfs["parameters"]["fsName"], "labfs");
        assert_eq!(cephfs["parameters"]["pool"], "labfs-replicated");
        // The Ceph image the CephCluster names must be preloaded like any container's.
        let mut without_ceph = images.clone();
        without_ceph.retain(|i| !i.starts_with("quay.io/ceph/ceph:"));
        let e = check(&mut cs, &ClusterFacts::at_build("a", "b", "c"), &pinned(&without_ceph)).unwrap_err();
        assert!(e.to_string().contains("CephCluster rook-ceph/rook-ceph field spec.cephVersion.image"), "{e}");
        // So must the CSI images the operator hands on.
        let mut without_csi = images.clone();
        without_csi.retain(|i| !i.contains("csi-provisioner"));
        let e = check(&mut cs, &ClusterFacts::at_build("a", "b", "c"), &pinned(&without_csi)).unwrap_err();
        assert!(e.to_string().contains("env[ROOK_CSI_PROVISIONER_IMAGE]"), "{e}");
    }

    fn upstream_site(dir: &Path, url: &str, sha256: &str) -> std::path::PathBuf {
        let d = dir.join("op");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("component.toml"),
            format!(
                "name = \"op\"\nnamespace = \"op\"\n[images]\nop = \"upstream.example/op:1\"\n\
                 [[upstream]]\nname = \"operator\"\nurl = \"{url}\"\nsha256 = \"{sha256}\"\n"
            ),
        )
        .unwrap();
        d
    }

    #[test]
    fn upstream_files_are_fetched_verified_labelled_and_their_images_overridden() {
        // Upstream text that minijinja would choke on: it is never rendered as a template.
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: op\n  namespace: op\n  annotations:\n    doc: \"{{ not a template }}\"\nspec:\n  template:\n    spec:\n      containers:\n        - name: op\n          image: upstream.example/op:1\n";
        let (base, files) = crate::build::kubebin::tests::serve(
            [("/op.yaml".to_string(), text.as_bytes().to_vec())].into_iter().collect(),
        );
        let sha = crate::build::kubebin::tests::hex_sha(text.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let site = upstream_site(dir.path(), "https://upstream.example/op.yaml", &sha);
        // The site's mirror stands in for the upstream URL; the file must still hash as pinned.
        let mut s = spec(&format!(
            "components = [\"op\"]\n[images]\n\"op.op\" = \"127.0.0.1:5000/op:1\"\n[upstream]\n\"op.operator\" = \"{base}/op.yaml\"\n"
        ));
        s.site = vec![site.clone()];
        let mut cs = resolve(&s).unwrap();
        assert_eq!(cs[0].upstream[0].url, format!("{base}/op.yaml"));
        fetch_upstream(&mut cs, &cache, false).unwrap();
        assert_eq!(cs[0].upstream[0].text, text);
        let images = declared_images(&cs);
        assert_eq!(images, ["127.0.0.1:5000/op:1"]);
        check(&mut cs, &ClusterFacts::at_build("a", "b", "c"), &pinned(&images)).unwrap();
        let r = stack::render(&cs[0], &ClusterFacts::at_build("a", "b", "c")).unwrap();
        let dep = find(&r, "Deployment", "op");
        assert_eq!(dep["spec"]["template"]["spec"]["containers"][0]["image"], "127.0.0.1:5000/op:1");
        assert_eq!(dep["metadata"]["annotations"]["doc"], "{{ not a template }}");
        assert_eq!(dep["metadata"]["labels"][stack::LABEL_COMPONENT], "op");
        // An image an upstream file runs must be preloaded like any other.
        let e = check(&mut cs.clone(), &ClusterFacts::at_build("a", "b", "c"), &[]).unwrap_err().to_string();
        assert!(e.contains("component op: Deployment op/op field spec.template.spec.containers[0].image uses image 127.0.0.1:5000/op:1"), "{e}");
        // Offline, the cache answers.
        files.lock().unwrap().clear();
        let mut again = resolve(&s).unwrap();
        fetch_upstream(&mut again, &cache, true).unwrap();
        assert_eq!(again[0].upstream[0].text, text);
        // A mirror serving another file fails the build naming it, and nothing of it is kept.
        files.lock().unwrap().insert("/op.yaml".into(), b"kind: Something\n".to_vec());
        let other = tempfile::tempdir().unwrap();
        let mut cs = resolve(&s).unwrap();
        let e = fetch_upstream(&mut cs, other.path(), false).unwrap_err().to_string();
        assert!(e.contains("upstream file op.operator") && e.contains(&format!("but {sha} is pinned")), "{e}");
        assert!(e.contains("put its sha256 in the component's [[upstream]] entry"), "{e}");
        assert_eq!(std::fs::read_dir(other.path().join("binaries/sha256")).unwrap().count(), 0);
        // Offline with an empty cache: not fetched, not retried; the component renders without it.
        let mut cs = resolve(&s).unwrap();
        fetch_upstream(&mut cs, other.path(), true).unwrap();
        assert!(cs[0].upstream[0].text.is_empty());
        assert!(stack::render(&cs[0], &ClusterFacts::at_build("a", "b", "c")).unwrap().objects.is_empty());
        // A mirror for a file the component does not have is refused.
        s.upstream.insert("op.nope".into(), format!("{base}/x"));
        let e = resolve(&s).unwrap_err().to_string();
        assert!(e.contains("component op has no upstream file \"nope\" (its files: operator)"), "{e}");
    }
}
