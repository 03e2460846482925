//! Who a request comes from: the address every per-client limit counts, the access line
//! logs and modules record (a session's address, a BI event's sender).
//!
//! It is the TCP peer, unless the peer is one of `server.trusted_proxies`. Then the
//! client is read from the proxies' header (`server.forwarded_header`: `X-Forwarded-For`,
//! or RFC 7239 `Forwarded`), walking the chain from the right, the entry the nearest proxy
//! appended, past every trusted proxy: the first address that is not a trusted proxy is the
//! client. Entries further left were written by the client itself and may be anything, so
//! they are never believed. A malformed or obfuscated entry (`unknown`, `_hidden`) ends the
//! walk at the proxy that passed it on. Headers from a peer that is not trusted are
//! ignored. The server's edge resolves this once per request ([`ResolvedClient`]).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use poem::{Request, http::HeaderMap};

use crate::config::ForwardedHeader;

/// The client the edge resolved behind trusted proxies, kept in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedClient {
    /// The client's address.
    pub ip: IpAddr,
    /// `https` or `http` as the proxy received it, when it said.
    pub scheme: Option<&'static str>,
}

/// The client's IP address (recorded with a session, say), or `None` when the connection
/// has no IP peer.
pub fn client_ip(req: &Request) -> Option<IpAddr> {
    match req.extensions().get::<ResolvedClient>() {
        Some(client) => Some(client.ip),
        None => req.remote_addr().as_socket_addr().map(|peer| peer.ip()),
    }
}

/// The scheme the client used: what a trusted proxy said, else `http` (Trellis itself
/// speaks plain HTTP).
pub fn scheme(req: &Request) -> &'static str {
    req.extensions()
        .get::<ResolvedClient>()
        .and_then(|client| client.scheme)
        .unwrap_or("http")
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

/// Parses `server.trusted_proxies`: CIDR blocks or single addresses; the first entry that
/// is neither on error.
pub fn parse_networks(entries: &[String]) -> Result<Vec<IpNet>, String> {
    entries
        .iter()
        .map(|entry| {
            let entry = entry.trim();
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| entry.to_owned())
        })
        .collect()
}

/// The trusted proxies and the header they write.
#[derive(Debug, Clone)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// From `server.trusted_proxies` and `server.forwarded_header` (checked when the
    /// configuration loads).
    pub fn new(entries: &[String], header: ForwardedHeader) -> Result<Self, String> {
        Ok(Self {
            networks: parse_networks(entries)?,
            header,
        })
    }

    /// Whether no proxy is trusted (the peer is always the client).
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.networks.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request from `peer` with `headers`, or `None` when the peer is not
    /// a trusted proxy (its headers are ignored and it is the client).
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> Option<ResolvedClient> {
        if !self.trusts(peer) {
            return None;
        }
        let (chain, scheme) = match self.header {
            ForwardedHeader::XForwardedFor => (
                list(headers, "x-forwarded-for")
                    .map(node)
                    .collect::<Vec<_>>(),
                list(headers, "x-forwarded-proto").last().and_then(proto),
            ),
            ForwardedHeader::Forwarded => {
                let elements: Vec<&str> = list(headers, "forwarded").collect();
                let chain = elements
                    .iter()
                    .filter_map(|element| parameter(element, "for"))
                    .map(node)
                    .collect();
                let scheme = elements
                    .iter()
                    .rev()
                    .find_map(|element| parameter(element, "proto"))
                    .and_then(proto);
                (chain, scheme)
            }
        };
        let mut client = peer.to_canonical();
        for hop in chain.into_iter().rev() {
            let Some(ip) = hop else { break };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        Some(ResolvedClient { ip: client, scheme })
    }
}

/// Every comma-separated entry of every `name` header, in order.
fn list<'a>(headers: &'a HeaderMap, name: &str) -> impl DoubleEndedIterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
}

/// The value of `key` in one `Forwarded` element (`for=…;proto=…`), unquoted.
fn parameter<'a>(element: &'a str, key: &str) -> Option<&'a str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().trim_matches('"'))
    })
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`; `None` for anything else.
fn node(text: &str) -> Option<IpAddr> {
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            text.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

fn proto(text: &str) -> Option<&'static str> {
    if text.eq_ignore_ascii_case("https") {
        Some("https")
    } else if text.eq_ignore_ascii_case("http") {
        Some("http")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use poem::http::HeaderValue;

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

    fn proxies(header: ForwardedHeader) -> TrustedProxies {
        TrustedProxies::new(&["10.0.0.0/8".into(), "2001:db8:ff::/48".into()], header)
            .expect("valid networks")
    }

    /// The client resolved for a request from `peer` with the header lines given.
    fn resolve(header: ForwardedHeader, peer: &str, lines: &[(&str, &str)]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            headers.append(
                poem::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        proxies(header)
            .resolve(peer.parse().expect("peer"), &headers)
            .map(|client| client.ip.to_string())
    }

    fn xff(peer: &str, chain: &str) -> Option<String> {
        resolve(
            ForwardedHeader::XForwardedFor,
            peer,
            &[("x-forwarded-for", chain)],
        )
    }

    #[test]
    fn the_right_most_untrusted_address_is_the_client() {
        assert_eq!(
            xff("10.0.0.2", "203.0.113.7").as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            xff("10.0.0.2", "203.0.113.7, 10.0.0.9").as_deref(),
            Some("203.0.113.7"),
            "past a second trusted proxy"
        );
    }

    #[test]
    fn spoofed_left_most_entries_are_not_believed() {
        assert_eq!(
            xff("10.0.0.2", "10.0.0.1, 198.51.100.1, 203.0.113.7").as_deref(),
            Some("203.0.113.7"),
            "what the client wrote before the proxy's entry is ignored"
        );
        assert_eq!(
            resolve(
                ForwardedHeader::XForwardedFor,
                "10.0.0.2",
                &[
                    ("x-forwarded-for", "1.2.3.4"),
                    ("x-forwarded-for", "203.0.113.7")
                ]
            )
            .as_deref(),
            Some("203.0.113.7"),
            "several header lines are one list"
        );
    }

    #[test]
    fn headers_from_untrusted_peers_are_ignored() {
        assert_eq!(xff("192.0.2.50", "203.0.113.7"), None);
        assert_eq!(
            xff("::ffff:10.0.0.2", "203.0.113.7").as_deref(),
            Some("203.0.113.7")
        );
    }

    #[test]
    fn ipv6_and_ports_are_read() {
        assert_eq!(
            xff("2001:db8:ff::1", "[2001:db8:1::7]:443").as_deref(),
            Some("2001:db8:1::7")
        );
        assert_eq!(
            xff("10.0.0.2", "203.0.113.7:5000").as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            xff("10.0.0.2", "2001:db8:1::7, ::ffff:10.0.0.9").as_deref(),
            Some("2001:db8:1::7")
        );
    }

    #[test]
    fn malformed_entries_end_the_walk_at_the_proxy_that_passed_them() {
        assert_eq!(
            xff("10.0.0.2", "not-an-address").as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(
            xff("10.0.0.2", "203.0.113.7, garbage, 10.0.0.9").as_deref(),
            Some("10.0.0.9")
        );
        assert_eq!(
            xff("10.0.0.2", ",,").as_deref(),
            Some("10.0.0.2"),
            "empty chain"
        );
        assert_eq!(
            resolve(ForwardedHeader::XForwardedFor, "10.0.0.2", &[]).as_deref(),
            Some("10.0.0.2"),
            "no header: the proxy itself"
        );
    }

    #[test]
    fn rfc_7239_forwarded_is_read_when_configured() {
        let forwarded = |value| {
            resolve(
                ForwardedHeader::Forwarded,
                "10.0.0.2",
                &[("forwarded", value)],
            )
        };
        assert_eq!(
            forwarded(r#"for=198.51.100.1, for="[2001:db8:1::7]:4711";proto=https"#).as_deref(),
            Some("2001:db8:1::7")
        );
        assert_eq!(forwarded("for=unknown").as_deref(), Some("10.0.0.2"));
        assert_eq!(
            forwarded("For=203.0.113.7;By=10.0.0.2").as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            resolve(
                ForwardedHeader::Forwarded,
                "10.0.0.2",
                &[("x-forwarded-for", "203.0.113.7")]
            )
            .as_deref(),
            Some("10.0.0.2"),
            "the other header is not read"
        );
    }

    #[test]
    fn the_scheme_comes_from_the_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let p = proxies(ForwardedHeader::XForwardedFor);
        let from = |peer: &str| p.resolve(peer.parse().expect("peer"), &headers);
        assert_eq!(from("10.0.0.2").and_then(|c| c.scheme), Some("https"));
        assert_eq!(from("192.0.2.50"), None);
    }

    #[test]
    fn bad_networks_are_named() {
        assert_eq!(
            parse_networks(&["10.0.0.0/8".into(), "10.0.0.0/33".into()]),
            Err("10.0.0.0/33".into())
        );
        assert!(parse_networks(&["192.0.2.1".into(), "::1".into()]).is_ok());
    }
}
