//! Client A — router R — server B, joined by two veth pairs: R forwards,
//! tracks connections and DNATs a Service VIP:80 to B:8080 in its
//! prerouting chain, as kube-proxy does in a node's namespace. Used where
//! flowtel runs on the node that translates (`--netns` R).

use super::netns::{Netns, NetnsGuard, VethEnd};
use super::Prerequisites;

pub const A_V4: &str = "198.18.0.1";
pub const RA_V4: &str = "198.18.0.2";
pub const RB_V4: &str = "198.19.0.2";
pub const B_V4: &str = "198.19.0.4";
pub const A_V6: &str = "fd00:a::1";
pub const RA_V6: &str = "fd00:a::2";
pub const RB_V6: &str = "fd00:b::2";
pub const B_V6: &str = "fd00:b::4";
pub const VIP: &str = "198.18.200.1";
pub const VIP_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// R's veths: towards A, towards B.
pub const IF_RA: &str = "ftra";
pub const IF_RB: &str = "ftrb";

/// The three namespaces, removed on drop.
pub struct RouterLab {
    pub a: Netns,
    pub r: Netns,
    pub b: Netns,
    // Last: removes the namespaces after everything that uses them.
    _guard: NetnsGuard,
}

impl RouterLab {
    pub fn new(tools: &Prerequisites) -> anyhow::Result<RouterLab> {
        let mut guard = NetnsGuard::new(tools);
        let a = guard.add("a")?;
        let r = guard.add("r")?;
        let b = guard.add("b")?;
        let end = |ifname: &str, mac: &str, v4: &str, v6: &str| VethEnd {
            ifname: ifname.into(),
            mac: mac.into(),
            v4: format!("{v4}/24"),
            v6: format!("{v6}/64"),
        };
        guard.veth(
            &a,
            &end("ftna", "02:00:00:00:0a:01", A_V4, A_V6),
            &r,
            &end(IF_RA, "02:00:00:00:0a:02", RA_V4, RA_V6),
        )?;
        guard.veth(
            &r,
            &end(IF_RB, "02:00:00:00:0b:02", RB_V4, RB_V6),
            &b,
            &end("ftnb", "02:00:00:00:0b:04", B_V4, B_V6),
        )?;
        a.ip(&["route", "add", "default", "via", RA_V4])?;
        b.ip(&["route", "add", "default", "via", RB_V4])?;
        r.sysctl("net.ipv4.ip_forward", "1")?;
        guard.enable_conntrack(&r)?;
        guard.nft(
            &r,
            "ip",
            "ft_nat",
            &format!(
                "chain pre {{\n  type nat hook prerouting priority -100; policy accept;\n  \
                 ip daddr {VIP} tcp dport {VIP_PORT} dnat to {B_V4}:{BACKEND_PORT}\n}}"
            ),
        )?;
        Ok(RouterLab {
            a,
            r,
            b,
            _guard: guard,
        })
    }
}
