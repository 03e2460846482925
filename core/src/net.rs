//! Who is calling, as rate limits key it.
//!
//! The client address is the TCP peer's. IPv6 clients are keyed by their /64: one host
//! usually holds a whole /64, so keying by the full address would let it rotate through
//! 2^64 addresses to dodge every per-address limit. An IPv4-mapped IPv6 address counts as
//! the IPv4 address it carries.

use std::net::IpAddr;

/// The client's IP address, when the connection has one.
pub fn client_ip(req: &poem::Request) -> Option<IpAddr> {
    req.remote_addr().as_socket_addr().map(|addr| addr.ip())
}

/// The key per-address limits count under: the IPv4 address, or the IPv6 /64.
pub fn rate_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str) -> String {
        rate_key(ip.parse().expect("an address"))
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }

    #[test]
    fn ipv4_and_mapped_ipv4_are_one_client() {
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
    }
}
