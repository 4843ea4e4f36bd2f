//! Tests only: a small HTTP/1.1 file server on loopback, standing in for a netboot master's
//! `/pxe/…` routes in unit tests (the real routes are exercised by the VM scenarios).

use std::io::{Read, Write};
use std::path::PathBuf;

/// Serves the files under `dir` at `/<prefix>/<path>` on 127.0.0.1, one connection at a time,
/// for the life of the test process; returns `http://127.0.0.1:PORT`. Anything else is a 404.
pub fn serve(dir: PathBuf, prefix: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut req = [0u8; 2048];
            let n = conn.read(&mut req).unwrap_or(0);
            let line = String::from_utf8_lossy(&req[..n]).lines().next().unwrap_or_default().to_string();
            let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
            let body = path
                .strip_prefix(prefix)
                .and_then(|p| p.strip_prefix('/'))
                .filter(|p| !p.split('/').any(|c| c == ".."))
                .and_then(|p| std::fs::read(dir.join(p)).ok());
            let _ = match body {
                Some(b) => conn
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())
                            .as_bytes(),
                    )
                    .and_then(|()| conn.write_all(&b)),
                None => conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            };
        }
    });
    format!("http://{addr}")
}
