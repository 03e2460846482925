//! Who a request comes from, as far as per-client limits are concerned.
//!
//! Today that is the TCP peer. Behind a reverse proxy every request would share the
//! proxy's address; reading the client address from a trusted proxy's header is a change
//! to [`client_address`] alone.

use std::net::{IpAddr, Ipv6Addr};

use poem::Request;

/// The client's IP address (recorded with a session, say), or `None` when the connection
/// has no IP peer.
pub fn client_ip(req: &Request) -> Option<IpAddr> {
    req.remote_addr().as_socket_addr().map(|peer| peer.ip())
}

/// The address `req`'s per-client limits are keyed by ([`address_key`] of the client's),
/// or `None` when the connection has no IP peer.
pub fn client_address(req: &Request) -> Option<IpAddr> {
    client_ip(req).map(address_key)
}

/// An address as a limit key: IPv4 as it is, IPv4-mapped IPv6 as IPv4, and other IPv6 by
/// its /64, the block one subscriber or host usually holds, so that moving through it
/// does not buy a fresh allowance with every address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> String {
        address_key(text.parse().expect("address")).to_string()
    }

    #[test]
    fn ipv6_clients_share_their_64_and_ipv4_stays_whole() {
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff:1:2:3"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
    }
}
