//! The node on its LAN beyond discovery. For now: time (`time`), the master being the LAN's
//! time source. Addressing, DHCP, DNS and the uplink come here too.

pub mod time;
