use std::collections::BTreeMap;

use serde_json::json;

use super::images::{covered, images_in, normalize};
use super::*;

fn pairs(items: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    items.iter().map(|(n, d)| (n.to_string(), d.iter().map(|x| x.to_string()).collect())).collect()
}

#[test]
fn order_puts_dependencies_first_and_keeps_the_given_order_otherwise() {
    let o = dependency_order(&pairs(&[
        ("notebooks", &["storage", "monitoring"]),
        ("monitoring", &["storage"]),
        ("storage", &[]),
        ("portal", &[]),
    ]))
    .unwrap();
    assert_eq!(o, ["storage", "monitoring", "notebooks", "portal"]);
}

#[test]
fn order_refuses_cycles_naming_them() {
    let e = dependency_order(&pairs(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &[])])).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("circle"), "{msg}");
    assert!(msg.contains("a → b → c → a"), "{msg}");
    let e = dependency_order(&pairs(&[("a", &["a"])])).unwrap_err();
    assert!(e.to_string().contains("depends on itself"), "{e}");
}

#[test]
fn order_refuses_unknown_dependencies() {
    let e = dependency_order(&pairs(&[("monitoring", &["storage"])])).unwrap_err();
    assert!(e.to_string().contains("monitoring depends on storage"), "{e}");
}

fn component(templates: &[(&str, &str)]) -> ResolvedComponent {
    ResolvedComponent {
        name: "storage".into(),
        namespace: "labforge-storage".into(),
        depends_on: vec![],
        images: BTreeMap::from([("provisioner".into(), "registry.lab:5000/lpp:v1".into())]),
        image_carrying: ImageCarrying {
            args: vec!["--helper-image".into()],
            env: vec!["HELPER".into()],
            configmap_pods: vec![],
            fields: vec![],
        },
        settings: toml::from_str("path = \"/var/lib/x\"\nreplicas = 2").unwrap(),
        ready: vec![],
        web: vec![],
        secrets: vec![],
        templates: templates.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect(),
        upstream: vec![],
        upstream_images: BTreeMap::new(),
        origin: "built-in".into(),
        build_digest: String::new(),
    }
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: provisioner
  namespace: {{ component.namespace }}
spec:
  replicas: {{ settings.replicas }}
  template:
    spec:
      initContainers:
        - name: init
          image: busybox
      containers:
        - name: p
          image: {{ images.provisioner }}
          args: ["start", "--helper-image=registry.lab:5000/helper:1", "--path", "{{ settings.path }}"]
          env:
            - name: HELPER
              value: other.example/helper:2
            - name: UNRELATED
              value: not-an-image
"#;

#[test]
fn render_labels_every_object_and_digests_them() {
    let c = component(&[
        ("a.yaml", DEPLOYMENT),
        (
            "b.yaml",
            "---\n# nothing\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {{ component.namespace }}\n",
        ),
    ]);
    let r = render(&c, &ClusterFacts::at_build("10.244.0.0/16", "10.96.0.0/12", "v1.36.5")).unwrap();
    assert_eq!(r.objects.len(), 2);
    for o in &r.objects {
        assert_eq!(o["metadata"]["labels"][LABEL_COMPONENT], "storage");
        assert_eq!(o["metadata"]["labels"][LABEL_MANAGED_BY], "labforge");
    }
    assert_eq!(r.objects[0]["spec"]["replicas"], 2);
    assert_eq!(r.digest.len(), 64);
    let again = render(&c, &ClusterFacts::at_build("10.244.0.0/16", "10.96.0.0/12", "v1.36.5")).unwrap();
    assert_eq!(r.digest, again.digest, "rendering is deterministic");
    let mut changed = c.clone();
    changed.settings.insert("replicas".into(), toml::Value::Integer(3));
    assert_ne!(render(&changed, &ClusterFacts::at_build("a", "b", "c")).unwrap().digest, r.digest);
}

#[test]
fn render_names_the_template_of_an_undefined_value_or_bad_yaml() {
    let c = component(&[("bad.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ settings.nope }}\n")]);
    let e = render(&c, &ClusterFacts::at_build("a", "b", "c")).unwrap_err().to_string();
    assert!(e.contains("component storage template bad.yaml"), "{e}");
    assert!(e.contains("undefined"), "{e}");
    let c = component(&[("y.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: [\n")]);
    let e = render(&c, &ClusterFacts::at_build("a", "b", "c")).unwrap_err().to_string();
    assert!(e.contains("y.yaml, document 1"), "{e}");
    let c = component(&[("n.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n")]);
    let e = format!("{:#}", render(&c, &ClusterFacts::at_build("a", "b", "c")).unwrap_err());
    assert!(e.contains("metadata.name"), "{e}");
    let twice = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: n\n";
    let c = component(&[("1.yaml", twice), ("2.yaml", twice)]);
    let e = render(&c, &ClusterFacts::at_build("a", "b", "c")).unwrap_err().to_string();
    assert!(e.contains("defined twice"), "{e}");
}

#[test]
fn images_are_found_in_containers_args_and_declared_env() {
    let c = component(&[("a.yaml", DEPLOYMENT)]);
    let r = render(&c, &ClusterFacts::at_build("a", "b", "c")).unwrap();
    let found = images_in(&r.objects[0], &c.image_carrying);
    let refs: Vec<(&str, &str)> = found.iter().map(|f| (f.field.as_str(), f.reference.as_str())).collect();
    assert_eq!(
        refs,
        [
            ("spec.template.spec.containers[0].image", "registry.lab:5000/lpp:v1"),
            ("spec.template.spec.containers[0].args[1] (--helper-image)", "registry.lab:5000/helper:1"),
            ("spec.template.spec.containers[0].env[HELPER]", "other.example/helper:2"),
            ("spec.template.spec.initContainers[0].image", "busybox"),
        ]
    );
    let cron = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "x", "image": "a/b:1"}]}}}}}});
    assert_eq!(images_in(&cron, &ImageCarrying::default())[0].reference, "a/b:1");
    let separate = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "x", "image": "a", "args": ["--helper-image", "h:1"]}]}});
    let f = images_in(&separate, &c.image_carrying);
    assert_eq!(f[1].reference, "h:1");
    // A flag ending `command` takes its value from the start of `args`.
    let split = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "x", "image": "a:1", "command": ["op", "--helper-image"], "args": ["h:2"]}]}});
    let f = images_in(&split, &c.image_carrying);
    assert_eq!(
        (f[1].field.as_str(), f[1].reference.as_str()),
        ("spec.containers[0].command[1] (--helper-image)", "h:2")
    );
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"image": "x"}});
    assert!(images_in(&cm, &c.image_carrying).is_empty());
    let carrying = ImageCarrying { configmap_pods: vec!["helperPod.yaml".into()], ..Default::default() };
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
        "data": {"helperPod.yaml": "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - name: h\n      image: busybox:1.37\n"}});
    let f = images_in(&cm, &carrying);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].field, "data[helperPod.yaml].spec.containers[0].image");
    assert_eq!(f[0].reference, "busybox:1.37");
    let broken =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"helperPod.yaml": "nope"}});
    assert_eq!(images_in(&broken, &carrying)[0].reference, "<not a Pod template with containers>");
}

#[test]
fn references_normalize_as_containerd_names_them() {
    assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
    assert_eq!(super::images::split("r:5000/a/b:1@sha256:ab"), ("r:5000/a/b", Some("1"), Some("sha256:ab")));
    assert_eq!(super::images::split("r:5000/a"), ("r:5000/a", None, None));
    assert_eq!(normalize("rancher/lpp:v0.0.30"), "docker.io/rancher/lpp:v0.0.30");
    assert_eq!(normalize("registry.lab:5000/k8s/pause:3.10"), "registry.lab:5000/k8s/pause:3.10");
    assert_eq!(normalize("localhost/x"), "localhost/x:latest");
    assert_eq!(normalize("127.0.0.1:5000/a/b@sha256:ab"), "127.0.0.1:5000/a/b@sha256:ab");
    let pre = vec![
        ("docker.io/library/busybox:1.37".to_string(), "sha256:aa".to_string()),
        ("127.0.0.1:5000/lpp:v1".to_string(), "sha256:bb".to_string()),
    ];
    assert!(covered("busybox:1.37", &pre));
    assert!(covered("library/busybox:1.37", &pre));
    assert!(!covered("busybox", &pre), "latest is not 1.37");
    assert!(covered("127.0.0.1:5000/lpp@sha256:bb", &pre), "the pinned digest of a preloaded repository");
    assert!(!covered("127.0.0.1:5000/other@sha256:bb", &pre));
    assert!(!covered("127.0.0.1:5000/lpp:v2", &pre));
}

#[test]
fn prune_selects_only_this_components_objects_that_are_gone() {
    let obj = |kind: &str, name: &str, comp: &str, managed: &str| {
        json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": "n",
            "labels": {LABEL_COMPONENT: comp, LABEL_MANAGED_BY: managed}}})
    };
    let listed = vec![
        obj("ConfigMap", "keep", "storage", "labforge"),
        obj("ConfigMap", "old", "storage", "labforge"),
        obj("ConfigMap", "theirs", "monitoring", "labforge"),
        obj("ConfigMap", "hand-made", "storage", "someone"),
        obj("Namespace", "gone", "storage", "labforge"),
        obj("PersistentVolumeClaim", "data", "storage", "labforge"),
    ];
    let current = vec![ObjectRef {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        namespace: Some("n".into()),
        name: "keep".into(),
    }];
    let stale = prune::stale("storage", &listed, &current);
    assert_eq!(stale.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["old"]);
}

#[test]
fn readiness_of_recorded_objects() {
    let dep = |gen: i64, obs: i64, avail: i64, upd: i64| {
        json!({"kind": "Deployment", "metadata": {"generation": gen}, "spec": {"replicas": 2},
            "status": {"observedGeneration": obs, "availableReplicas": avail, "updatedReplicas": upd, "replicas": 2}})
    };
    assert_eq!(readiness("Deployment", &dep(2, 2, 2, 2), None), Readiness::Ready);
    assert!(
        matches!(readiness("Deployment", &dep(3, 2, 2, 2), None), Readiness::Waiting(m) if m.contains("generation 3"))
    );
    assert!(matches!(readiness("Deployment", &dep(2, 2, 1, 2), None), Readiness::Waiting(m) if m.contains("1 of 2")));
    let ds = json!({"metadata": {"generation": 1}, "status": {"observedGeneration": 1,
        "desiredNumberScheduled": 3, "numberAvailable": 2, "updatedNumberScheduled": 3}});
    assert!(matches!(readiness("DaemonSet", &ds, None), Readiness::Waiting(_)));
    let job_failed =
        json!({"status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}});
    assert!(matches!(readiness("Job", &job_failed, None), Readiness::Failed(m) if m.contains("BackoffLimitExceeded")));
    let crd = json!({"status": {"conditions": [{"type": "Established", "status": "True"}]}});
    assert_eq!(readiness("CustomResourceDefinition", &crd, None), Readiness::Ready);
    let cr = json!({"status": {"conditions": [{"type": "Ready", "status": "False", "message": "mons not up"}]}});
    assert!(matches!(readiness("CephCluster", &cr, Some("Ready")), Readiness::Waiting(m) if m.contains("mons not up")));
    assert_eq!(readiness("StorageClass", &json!({}), None), Readiness::Ready);
}

#[test]
fn settings_merge_only_declared_keys_of_the_same_type() {
    let file: ComponentFile = toml::from_str(
        "name = \"monitoring\"\nnamespace = \"labforge-monitoring\"\n[settings]\nretention = \"15d\"\nreplicas = 1\n",
    )
    .unwrap();
    let m = merge_settings(&file, &toml::from_str("retention = \"30d\"").unwrap()).unwrap();
    assert_eq!(m["retention"].as_str(), Some("30d"));
    assert_eq!(m["replicas"].as_integer(), Some(1));
    let e = merge_settings(&file, &toml::from_str("retension = \"30d\"").unwrap()).unwrap_err();
    assert!(e.to_string().contains("no setting \"retension\" (its settings: replicas, retention)"), "{e}");
    let e = merge_settings(&file, &toml::from_str("replicas = \"two\"").unwrap()).unwrap_err();
    assert!(e.to_string().contains("expected a integer, got a string"), "{e}");
}

#[test]
fn component_folders_are_checked() {
    let files = |toml: &str, with_template: bool| {
        let mut m = BTreeMap::from([("component.toml".to_string(), toml.to_string())]);
        if with_template {
            m.insert("a.yaml".into(), "kind: x".into());
        }
        m
    };
    let ok = "name = \"storage\"\nnamespace = \"labforge-storage\"\n";
    assert!(ComponentSource::from_files("stack/storage", files(ok, true)).is_ok());
    let e = ComponentSource::from_files("stack/storage", files(ok, false)).unwrap_err();
    assert!(e.to_string().contains("no templates"), "{e}");
    let e = ComponentSource::from_files("s", files("name = \"Storage\"\nnamespace = \"x\"\n", true)).unwrap_err();
    assert!(format!("{e:#}").contains("not a component name"), "{e:#}");
    let e = ComponentSource::from_files("s", files("name = \"a\"\nnamespace = \"x\"\nbogus = 1\n", true)).unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
}
