//! Where things live in a labforge image, for the builder that puts them there and the agent
//! that finds them.

/// The preloaded container images: one OCI image layout. Under `/usr` rather than the state
/// partition (`/var/lib/labforge`), which is mounted over the image's directory.
pub const PRELOAD_LAYOUT_DIR: &str = "/usr/lib/labforge/preload";

/// The agent's systemd unit, installed by the builder.
pub const AGENT_UNIT: &str = include_str!("../../agent/labforge-agent.service");
