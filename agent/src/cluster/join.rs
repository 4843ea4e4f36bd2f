//! The join-info exchange: a worker proves it holds the cluster secret (HMAC over its id, a
//! timestamp and a nonce); the master answers with the join info encrypted under a key derived
//! from the secret and that nonce (ChaCha20-Poly1305), so the bootstrap token never crosses the
//! LAN in clear and only a secret holder can produce or read an answer.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::cluster::discovery::beacon::MAX_SKEW_MS;
use crate::secret::Secret;

const DOMAIN: &[u8] = b"labforge-join-v1";

/// What a worker needs to join: minted by the master after `kubeadm init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinInfo {
    pub cluster_uid: String,
    /// `host:port` of the API server (a name every node resolves to the master).
    pub endpoint: String,
    /// The master's LAN address, for the name above.
    pub master_address: String,
    /// Bootstrap token (`abcdef.0123456789abcdef`); empty when Kubernetes is disabled.
    pub token: String,
    /// `sha256:<hex>` of the cluster CA's public key; empty when Kubernetes is disabled.
    pub ca_cert_hash: String,
    /// Unix seconds when the token expires (0: no token).
    pub token_expires: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub node: String,
    pub ts_ms: u64,
    pub nonce: String,
    pub mac: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub nonce: String,
    pub ciphertext: String,
}

fn request_mac(secret: &Secret, node: &str, ts_ms: u64, nonce: &str) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.bytes()).expect("any key length");
    m.update(DOMAIN);
    m.update(format!("\0{node}\0{ts_ms}\0{nonce}").as_bytes());
    m
}

fn response_key(secret: &Secret, request_nonce: &str) -> ChaCha20Poly1305 {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(request_nonce.as_bytes()), secret.bytes());
    let mut key = [0u8; 32];
    hk.expand(b"labforge-join-v1 response", &mut key).expect("32 bytes is a valid length");
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).expect("random bytes");
    hex::encode(b)
}

pub fn make_request(secret: &Secret, node: &str, ts_ms: u64) -> Request {
    let nonce = random_hex(16);
    let mac = hex::encode(request_mac(secret, node, ts_ms, &nonce).finalize().into_bytes());
    Request { node: node.into(), ts_ms, nonce, mac }
}

/// Authentic join requests remembered (to refuse replays) within the freshness window.
pub const MAX_NONCES: usize = 4096;

/// The master's side: remembers request nonces to refuse replays.
#[derive(Default)]
pub struct Server {
    seen: Mutex<HashMap<String, u64>>,
}

impl Server {
    pub fn answer(&self, secret: &Secret, req: &Request, info: &JoinInfo, now_ms: u64) -> Result<Response> {
        let tag = hex::decode(&req.mac).map_err(|_| anyhow!("malformed MAC"))?;
        request_mac(secret, &req.node, req.ts_ms, &req.nonce)
            .verify_slice(&tag)
            .map_err(|_| anyhow!("bad MAC: the requester does not hold this cluster's secret"))?;
        if req.ts_ms.abs_diff(now_ms) > MAX_SKEW_MS {
            bail!("stale request (clock difference over {} s)", MAX_SKEW_MS / 1000);
        }
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.retain(|_, ts| ts.abs_diff(now_ms) <= MAX_SKEW_MS);
            // Only secret holders get here; still, the cache never grows without bound, and a
            // full one refuses rather than forgets (forgetting would let a replay through).
            if seen.len() >= MAX_NONCES {
                bail!("too many join requests in the last {} s; try again later", MAX_SKEW_MS / 1000);
            }
            if seen.insert(req.nonce.clone(), req.ts_ms).is_some() {
                bail!("replayed request");
            }
        }
        let nonce_bytes = {
            let mut b = [0u8; 12];
            getrandom::getrandom(&mut b).map_err(|e| anyhow!("random bytes: {e}"))?;
            b
        };
        let plaintext = serde_json::to_vec(info)?;
        let ct = response_key(secret, &req.nonce)
            .encrypt(Nonce::from_slice(&nonce_bytes), Payload { msg: &plaintext, aad: req.node.as_bytes() })
            .map_err(|_| anyhow!("encrypting join info"))?;
        Ok(Response { nonce: hex::encode(nonce_bytes), ciphertext: hex::encode(ct) })
    }
}

/// The worker's side: decrypts and authenticates the master's answer.
pub fn open_response(secret: &Secret, req: &Request, resp: &Response) -> Result<JoinInfo> {
    let nonce = hex::decode(&resp.nonce).ok().filter(|n| n.len() == 12).context("malformed response nonce")?;
    let ct = hex::decode(&resp.ciphertext).context("malformed response")?;
    let plain = response_key(secret, &req.nonce)
        .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad: req.node.as_bytes() })
        .map_err(|_| anyhow!("the answer is not from a holder of this cluster's secret"))?;
    serde_json::from_slice(&plain).context("reading join info")
}

/// Asks the master at `addr` (host:port) for join info.
pub fn fetch(addr: &str, secret: &Secret, node: &str, now_ms: u64) -> Result<JoinInfo> {
    let req = make_request(secret, node, now_ms);
    let url = format!("http://{addr}/join-info");
    let resp: Response = crate::sys::http::Client::with_timeout(std::time::Duration::from_secs(10))
        .post_json(&url, &req)
        .with_context(|| format!("asking {url} for join info"))?;
    open_response(secret, &req, &resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> JoinInfo {
        JoinInfo {
            cluster_uid: "u1".into(),
            endpoint: "labforge-api:6443".into(),
            master_address: "10.0.0.2".into(),
            token: "abcdef.0123456789abcdef".into(),
            ca_cert_hash: "sha256:00".into(),
            token_expires: 1,
        }
    }

    #[test]
    fn a_secret_holder_gets_the_join_info() {
        let s = Secret::from_bytes([7; 32]);
        let server = Server::default();
        let req = make_request(&s, "w1", 1000);
        let resp = server.answer(&s, &req, &info(), 1000).unwrap();
        assert!(!resp.ciphertext.contains("abcdef"), "the token is not in clear");
        assert_eq!(open_response(&s, &req, &resp).unwrap(), info());
    }

    #[test]
    fn wrong_secret_replay_and_stale_requests_are_refused() {
        let s = Secret::from_bytes([7; 32]);
        let rogue = Secret::from_bytes([9; 32]);
        let server = Server::default();
        let err = server.answer(&s, &make_request(&rogue, "r", 1000), &info(), 1000).unwrap_err();
        assert!(err.to_string().contains("bad MAC"));
        let req = make_request(&s, "w1", 1000);
        server.answer(&s, &req, &info(), 1000).unwrap();
        assert!(server.answer(&s, &req, &info(), 1001).unwrap_err().to_string().contains("replayed"));
        let old = make_request(&s, "w1", 0);
        assert!(server.answer(&s, &old, &info(), MAX_SKEW_MS + 1).unwrap_err().to_string().contains("stale"));
        // A response meant for another request, or read with another secret, does not open.
        let resp = server.answer(&s, &make_request(&s, "w2", 1000), &info(), 1000).unwrap();
        assert!(open_response(&s, &req, &resp).is_err());
        let req3 = make_request(&s, "w3", 1000);
        let resp3 = server.answer(&s, &req3, &info(), 1000).unwrap();
        assert!(open_response(&rogue, &req3, &resp3).is_err());
    }
}
