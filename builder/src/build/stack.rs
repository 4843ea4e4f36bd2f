//! The stack stage: resolves `[stack]` against the built-in components (embedded from the
//! repository's `stack/` folder) and the site's own folders, adds every image they declare to the
//! preload set, renders every template with the values known at build time and proves the image
//! air-gapped: each image reference in a rendered object must be preloaded. The result is
//! `stack.json` in the image, which the master's agent applies.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use include_dir::{include_dir, Dir};
use labforge_core::stack::{self, images::images_in, ClusterFacts, ComponentSource, ResolvedComponent, StackPlan};

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
                origin: if c.origin.starts_with("stack/") { "built-in".into() } else { c.origin.clone() },
                build_digest: String::new(),
            })
        })
        .collect()
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
pub fn build_facts(spec: &Spec) -> ClusterFacts {
    ClusterFacts::at_build(&spec.cluster.pod_cidr, &spec.cluster.service_cidr, &spec.kubernetes.version)
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
pub fn install(root: &Path, components: &[ResolvedComponent]) -> Result<()> {
    let path = root.join(stack::STACK_PLAN.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let plan = StackPlan { components: components.to_vec() };
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
        assert!(e.to_string().contains("no component \"storag\" (known: monitoring, storage"), "{e}");
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
        assert_eq!(jobs, ["prometheus", "kubelet", "cadvisor", "node-exporter", "labforge-agent"]);
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
}
