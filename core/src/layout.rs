//! Where things live in a labforge image, for the builder that puts them there and the agent
//! that finds them.

/// The preloaded container images: one OCI image layout. Under `/usr` rather than the state
/// partition (`/var/lib/labforge`), which is mounted over the image's directory.
pub const PRELOAD_LAYOUT_DIR: &str = "/usr/lib/labforge/preload";

/// Annotation (value `"true"`) on the layout's index entries a node needs before kubeadm runs:
/// the sandbox image and the images kubeadm itself listed. The builder puts them first; the
/// agent starts kubeadm once they are in and imports the rest (the stack's) meanwhile. A layout
/// without any marked entry makes kubeadm wait for every image.
pub const PRELOAD_CLUSTER_ANNOTATION: &str = "dev.labforge.preload.cluster";

/// The agent's systemd unit, installed by the builder.
pub const AGENT_UNIT: &str = include_str!("../../agent/labforge-agent.service");
