//! Named networks: an address no Kubernetes object claims is reported as the
//! name of the network it falls in (`cluster`, `vpc`, `internet`, ...), not
//! as itself, so traffic to the outside world costs a handful of series
//! instead of one per remote address.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// One named network in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub name: String,
    /// IPv4 and IPv6 prefixes, e.g. `10.0.0.0/8` or `fd00::/8`.
    pub cidrs: Vec<String>,
}

/// The defaults: the address ranges every node has. Clusters add their pod,
/// service and VPC ranges in front of these.
pub fn default_networks() -> Vec<NetworkConfig> {
    let net = |name: &str, cidrs: &[&str]| NetworkConfig {
        name: name.into(),
        cidrs: cidrs.iter().map(|c| (*c).to_string()).collect(),
    };
    vec![
        net("loopback", &["127.0.0.0/8", "::1/128"]),
        net("link_local", &["169.254.0.0/16", "fe80::/10"]),
        net(
            "private",
            &[
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "fc00::/7",
            ],
        ),
    ]
}

/// The name given to addresses in none of the configured networks.
pub const DEFAULT_UNMATCHED: &str = "internet";

/// Longest-prefix classification of addresses into named networks.
#[derive(Debug, Clone)]
pub struct NamedNetworks {
    /// Longest prefix first, so the first match is the most specific.
    prefixes: Vec<(IpNet, Arc<str>)>,
    unmatched: Arc<str>,
}

impl NamedNetworks {
    /// Parses the configured networks. The error names the network and the
    /// prefix that is wrong, in words an operator can act on.
    pub fn new(networks: &[NetworkConfig], unmatched: &str) -> Result<Self, String> {
        let mut prefixes = Vec::new();
        for (i, net) in networks.iter().enumerate() {
            if net.name.trim().is_empty() {
                return Err(format!("network {i} has an empty name"));
            }
            if net.cidrs.is_empty() {
                return Err(format!("network {:?} lists no cidrs", net.name));
            }
            let name: Arc<str> = Arc::from(net.name.as_str());
            for cidr in &net.cidrs {
                let parsed: IpNet = cidr.trim().parse().map_err(|_| {
                    format!(
                        "network {:?}: {cidr:?} is not a CIDR prefix (write it as 10.0.0.0/8 or fd00::/8)",
                        net.name
                    )
                })?;
                if parsed.trunc() != parsed {
                    return Err(format!(
                        "network {:?}: {cidr:?} has host bits set; did you mean {}?",
                        net.name,
                        parsed.trunc()
                    ));
                }
                prefixes.push((parsed, name.clone()));
            }
        }
        if unmatched.trim().is_empty() {
            return Err("the name for unmatched addresses is empty".into());
        }
        // Stable: for equal prefixes the network listed first wins.
        prefixes.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Ok(Self {
            prefixes,
            unmatched: Arc::from(unmatched),
        })
    }

    /// The name of the most specific network holding `ip`.
    pub fn classify(&self, ip: IpAddr) -> &Arc<str> {
        let ip = canonical(ip);
        self.prefixes
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map_or(&self.unmatched, |(_, name)| name)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are classified as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn defaults_name_the_usual_ranges() {
        let n = NamedNetworks::new(&default_networks(), DEFAULT_UNMATCHED).expect("defaults");
        assert_eq!(&**n.classify(ip("10.1.2.3")), "private");
        assert_eq!(&**n.classify(ip("127.0.0.1")), "loopback");
        assert_eq!(&**n.classify(ip("fe80::1")), "link_local");
        assert_eq!(&**n.classify(ip("::ffff:192.168.1.1")), "private");
        assert_eq!(&**n.classify(ip("8.8.8.8")), "internet");
        assert_eq!(&**n.classify(ip("2001:db8::1")), "internet");
    }

    #[test]
    fn the_most_specific_prefix_wins_whatever_the_order() {
        let mut nets = default_networks();
        nets.push(NetworkConfig {
            name: "cluster".into(),
            cidrs: vec!["10.244.0.0/16".into()],
        });
        let n = NamedNetworks::new(&nets, "outside").expect("valid");
        assert_eq!(&**n.classify(ip("10.244.3.4")), "cluster");
        assert_eq!(&**n.classify(ip("10.245.3.4")), "private");
        assert_eq!(&**n.classify(ip("1.1.1.1")), "outside");
    }

    #[test]
    fn bad_prefixes_are_named() {
        let bad = |cidr: &str| {
            NamedNetworks::new(
                &[NetworkConfig {
                    name: "vpc".into(),
                    cidrs: vec![cidr.into()],
                }],
                DEFAULT_UNMATCHED,
            )
            .expect_err("must be refused")
        };
        assert!(bad("10.0.0.0").contains("\"vpc\""), "{}", bad("10.0.0.0"));
        assert!(bad("10.0.0.1/8").contains("did you mean 10.0.0.0/8"));
        assert!(bad("fd00::/129").contains("not a CIDR prefix"));
    }
}
