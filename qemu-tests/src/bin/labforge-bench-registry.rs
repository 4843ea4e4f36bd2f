//! For `make bench`: starts a real registry on 127.0.0.1, stocks it with incompressible test
//! images, prints `{"addr":…,"refs":[…],"bytes":…}` on one line, and serves until stdin closes.

use std::io::{Read, Write};

use anyhow::Result;
use qemu_tests::registry::{Pusher, Registry};

fn main() -> Result<()> {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (images, layers, layer_mib) = (arg(1, 5), arg(2, 2), arg(3, 50));
    let reg = Registry::start()?;
    let p = Pusher::new(&format!("http://{}", reg.addr));
    let mut refs = Vec::new();
    let mut total = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..images {
        let mut files = Vec::new();
        for _ in 0..layers {
            let mut data = vec![0u8; layer_mib << 20];
            for chunk in data.chunks_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
            }
            files.push(data);
        }
        // One layer per file: push each file as its own single-file image layer set.
        let named: Vec<(String, &[u8])> =
            files.iter().enumerate().map(|(k, d)| (format!("data{k}"), d.as_slice())).collect();
        let entries: Vec<(&str, &[u8], u32)> = named.iter().map(|(n, d)| (n.as_str(), *d, 0o644)).collect();
        p.image_layers(&format!("bench/img{i}"), "1", &entries, &["/data0"])?;
        total += (layers * (layer_mib << 20)) as u64;
        refs.push(format!("{}/bench/img{i}:1", reg.addr));
    }
    println!("{}", serde_json::json!({ "addr": reg.addr, "refs": refs, "bytes": total }));
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}
