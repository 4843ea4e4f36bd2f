//! labforge-core: what the builder and the agent share — the node config baked into every image
//! and its tables (`config`), the installers' manifests (`manifest`), where things live in an
//! image (`layout`), the cluster secret (`secret`), the wire enums (`wire`), and the synchronous
//! block-device layer both sides need (`disk` facts and probing, `blockcopy`, `cmd`, `roots`).
//! No async runtime, no HTTP server: the builder links this, not the agent.

pub mod blockcopy;
pub mod cmd;
pub mod config;
pub mod disk;
pub mod lab;
pub mod layout;
pub mod manifest;
pub mod roots;
pub mod secret;
pub mod stack;
pub mod wire;
