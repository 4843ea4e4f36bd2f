//! The portal: one page on the master's port 80 for the people who use the lab — every stack
//! component with its state and version, and links to the web UIs (each on its fixed port, at
//! the address the browser used). It says nothing a `/status` reader could not learn.

use crate::stack::plan::State;
use crate::status::{Role, Status};

/// Port 80: what a browser asks when given the master's address.
pub const PORT: u16 = 80;

/// Escapes text for HTML (element content and quoted attributes).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The host a browser reached us at (the `Host` header without its port), if it is a plain
/// name or address; links use it so they work whether people type a name or an address.
pub fn link_host(host_header: Option<&str>, fallback: &str) -> String {
    let h = host_header.unwrap_or("");
    let h = if h.starts_with('[') {
        h.split(']').next().map(|x| format!("{x}]")).unwrap_or_default()
    } else {
        h.split(':').next().unwrap_or("").to_string()
    };
    let ok = !h.is_empty() && h.len() <= 253 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    if ok {
        h
    } else {
        fallback.to_string()
    }
}

/// The page for status `s`, with links at `host`.
pub fn page(s: &Status, host: &str) -> String {
    let mut body = String::new();
    let title = format!("{} — labforge", s.image);
    body.push_str(&format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"30\"><title>{}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:60em}}td,th{{padding:.3em .8em;text-align:left}}\
         .ready{{color:#080}}.failed{{color:#b00}}</style></head><body><h1>{}</h1>",
        esc(&title),
        esc(&s.image)
    ));
    if s.role != Role::Master {
        match &s.master_address {
            Some(m) => body.push_str(&format!(
                "<p>This PC ({}) is a {} of the lab cluster. The portal is on the master: <a href=\"http://{m}/\">http://{m}/</a></p>",
                esc(&s.node.hostname),
                esc(&s.role.to_string()),
                m = esc(m)
            )),
            None => body.push_str(&format!("<p>This PC ({}) is not part of a cluster yet: {}</p>", esc(&s.node.hostname), esc(&s.message))),
        }
        body.push_str("</body></html>\n");
        return body;
    }
    let (ready, total) =
        s.kube_api.as_ref().map(|k| (k.nodes.iter().filter(|n| n.ready).count(), k.nodes.len())).unwrap_or((0, 0));
    let version = s.kube_api.as_ref().and_then(|k| k.version.clone()).unwrap_or_else(|| "not answering yet".into());
    body.push_str(&format!(
        "<p>Kubernetes {} · {ready} of {total} nodes Ready · master {}</p>",
        esc(&version),
        esc(&s.node.hostname)
    ));
    match &s.stack {
        None => body.push_str("<p>This image runs no stack components.</p>"),
        Some(st) => {
            body.push_str(&format!("<h2>Services</h2><p>{}</p><table><tr><th>component</th><th>state</th><th>version</th><th>open</th><th></th></tr>", esc(&st.message)));
            for c in &st.components {
                let state =
                    serde_json::to_value(c.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
                let class = match c.state {
                    State::Ready => "ready",
                    State::Failed => "failed",
                    _ => "",
                };
                let links: Vec<String> = c
                    .web
                    .iter()
                    .map(|w| {
                        format!("<a href=\"http://{}:{}{}\">{}</a>", esc(host), w.port, esc(&w.path), esc(&w.title))
                    })
                    .collect();
                body.push_str(&format!(
                    "<tr><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&c.name),
                    esc(&state),
                    esc(&c.version),
                    links.join(" · "),
                    esc(&c.message)
                ));
            }
            body.push_str("</table>");
        }
    }
    body.push_str("</body></html>\n");
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{ComponentStatus, StackStatus};

    fn master() -> Status {
        let mut s = Status::minimal("lab", "id");
        s.role = Role::Master;
        s.stack = Some(StackStatus {
            state: "applying".into(),
            message: "1 of 2 components ready".into(),
            components: vec![
                ComponentStatus {
                    name: "monitoring".into(),
                    namespace: "labforge-monitoring".into(),
                    state: State::Waiting,
                    message: "Deployment labforge-monitoring/prometheus: 0 of 1 replicas available, 1 updated".into(),
                    applied_digest: None,
                    failures: 0,
                    version: "prometheus v3.5.0".into(),
                    web: vec![labforge_core::stack::Web {
                        title: "Prometheus".into(),
                        port: 30090,
                        path: "/".into(),
                        when: None,
                    }],
                },
                ComponentStatus {
                    name: "<script>".into(),
                    namespace: "x".into(),
                    state: State::Failed,
                    message: "a & b".into(),
                    applied_digest: None,
                    failures: 1,
                    version: String::new(),
                    web: vec![],
                },
            ],
            last_round: None,
        });
        s
    }

    #[test]
    fn the_master_lists_components_with_links_at_the_address_the_browser_used() {
        let html = page(&master(), "10.0.0.2");
        assert!(html.contains("<a href=\"http://10.0.0.2:30090/\">Prometheus</a>"), "{html}");
        assert!(html.contains("prometheus v3.5.0"), "{html}");
        assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"), "escaped: {html}");
        assert!(html.contains("a &amp; b"));
        assert!(html.contains("class=\"failed\""));
    }

    #[test]
    fn a_worker_points_at_the_master_and_odd_hosts_fall_back() {
        let mut s = master();
        s.role = Role::Worker;
        s.master_address = Some("10.0.0.2".into());
        let html = page(&s, "x");
        assert!(html.contains("<a href=\"http://10.0.0.2/\">"), "{html}");
        assert!(!html.contains("Prometheus"));
        assert_eq!(link_host(Some("lab-master:80"), "10.0.0.2"), "lab-master");
        assert_eq!(link_host(Some("10.0.0.2"), "f"), "10.0.0.2");
        assert_eq!(link_host(Some("evil\"><script>"), "10.0.0.2"), "10.0.0.2");
        assert_eq!(link_host(None, "10.0.0.2"), "10.0.0.2");
    }
}
