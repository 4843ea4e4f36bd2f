//! The one HTTP client: connect and read timeouts on every request, and a size cap on every
//! body read whole (a peer on the LAN cannot make the agent buffer without bound).

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

const CONNECT: Duration = Duration::from_secs(10);
const READ: Duration = Duration::from_secs(60);
/// Bodies read whole (JSON answers) are never larger than this.
pub const SMALL_BODY_MAX: u64 = 4 << 20;

/// An HTTP client with the agent's timeouts.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
}

impl Default for Client {
    fn default() -> Self {
        Client::with_timeout(READ)
    }
}

impl Client {
    /// A client whose reads give up after `read` of silence.
    pub fn with_timeout(read: Duration) -> Self {
        Client { agent: ureq::AgentBuilder::new().timeout_connect(CONNECT.min(read)).timeout_read(read).build() }
    }

    /// A GET whose body is streamed by the caller (which checks what it reads against a digest
    /// or a size); the declared length, if any, comes along.
    pub fn get(&self, url: &str) -> Result<Body> {
        let resp = self.agent.get(url).call().with_context(|| format!("fetching {url}"))?;
        let len = resp.header("Content-Length").and_then(|l| l.parse::<u64>().ok());
        Ok(Body { len, reader: Box::new(resp.into_reader()) })
    }

    /// A GET of a JSON document of at most [`SMALL_BODY_MAX`] bytes.
    pub fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T> {
        let body = self.get(url)?;
        parse(url, body.reader)
    }

    /// A POST of a JSON document, answered by one of at most [`SMALL_BODY_MAX`] bytes.
    pub fn post_json<Q: Serialize, A: DeserializeOwned>(&self, url: &str, request: &Q) -> Result<A> {
        let resp = self.agent.post(url).send_json(request).with_context(|| format!("posting to {url}"))?;
        parse(url, resp.into_reader())
    }
}

impl Client {
    /// A POST of a JSON document answered by a short text; a refusal's text (at most 4 KiB)
    /// becomes the error.
    pub fn post_for_text<Q: Serialize>(&self, url: &str, request: &Q) -> Result<String> {
        let text = |r: ureq::Response| {
            let mut s = String::new();
            let _ = r.into_reader().take(4096).read_to_string(&mut s);
            s.trim().to_string()
        };
        match self.agent.post(url).send_json(request) {
            Ok(r) => Ok(text(r)),
            Err(ureq::Error::Status(code, r)) => bail!("{url} refused ({code}): {}", text(r)),
            Err(e) => Err(e).with_context(|| format!("posting to {url}")),
        }
    }
}

/// A response body to stream.
pub struct Body {
    /// `Content-Length`, when the server sent one.
    pub len: Option<u64>,
    pub reader: Box<dyn Read + Send + Sync + 'static>,
}

fn parse<T: DeserializeOwned>(url: &str, reader: impl Read) -> Result<T> {
    let mut bytes = Vec::new();
    reader
        .take(SMALL_BODY_MAX + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the answer from {url}"))?;
    if bytes.len() as u64 > SMALL_BODY_MAX {
        bail!("{url} answered with more than {SMALL_BODY_MAX} bytes; refusing to read it");
    }
    serde_json::from_slice(&bytes).with_context(|| format!("reading the answer from {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// A one-shot HTTP server on loopback answering `body`.
    fn serve_once(body: Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(&body);
        });
        format!("http://{addr}/x")
    }

    #[test]
    fn json_answers_are_read_and_oversize_ones_refused() {
        let v: serde_json::Value = Client::default().get_json(&serve_once(b"{\"a\":1}".to_vec())).unwrap();
        assert_eq!(v["a"], 1);
        let big = vec![b' '; SMALL_BODY_MAX as usize + 10];
        let err = Client::default().get_json::<serde_json::Value>(&serve_once(big)).unwrap_err();
        assert!(format!("{err:#}").contains("more than"), "{err:#}");
    }

    #[test]
    fn streamed_bodies_carry_their_length() {
        let b = Client::default().get(&serve_once(b"hello".to_vec())).unwrap();
        assert_eq!(b.len, Some(5));
    }
}
