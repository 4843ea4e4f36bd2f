//! Discovery: authenticated UDP beacons on the LAN (port 9744) and the table of peers they
//! describe.

pub mod beacon;
pub mod net;

pub use beacon::{Beacon, Rejection, Verifier};
