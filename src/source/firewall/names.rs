//! The Kubernetes objects behind well-known chains and comments:
//! kube-proxy's Services (iptables and nftables modes), Calico's (and
//! Canal's) policies and profiles, kube-router's network policies. A rule
//! nobody is recognised in keeps only its table, chain and position.

use crate::telemetry::catalogue;

/// What a rule is known to belong to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleNames {
    /// `kube-proxy`, `calico`, `kube-router` or `antrea`.
    pub owner: Option<&'static str>,
    pub namespace: Option<String>,
    pub service: Option<String>,
    /// The Service port's name (`http`), as kube-proxy writes it.
    pub service_port: Option<String>,
    /// The endpoint (`10.0.0.5:80`) a kube-proxy rule sends to.
    pub endpoint: Option<String>,
    /// `NetworkPolicy`, `GlobalNetworkPolicy`, `CalicoNetworkPolicy`,
    /// `Profile` or `DefaultDeny`.
    pub policy_kind: Option<&'static str>,
    pub policy: Option<String>,
}

impl RuleNames {
    /// As attributes, in a fixed order.
    pub fn attributes(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut put = |k: &'static str, v: Option<&str>| {
            if let Some(v) = v {
                out.push((k, v.to_owned()));
            }
        };
        put(catalogue::FIREWALL_OWNER, self.owner);
        put(catalogue::K8S_NAMESPACE, self.namespace.as_deref());
        put(catalogue::K8S_SERVICE, self.service.as_deref());
        put(
            catalogue::FIREWALL_SERVICE_PORT,
            self.service_port.as_deref(),
        );
        put(catalogue::FIREWALL_ENDPOINT, self.endpoint.as_deref());
        put(catalogue::FIREWALL_POLICY_KIND, self.policy_kind);
        put(catalogue::FIREWALL_POLICY, self.policy.as_deref());
        out
    }
}

/// Names a rule from its chain and comment.
pub fn name(chain: &str, comment: Option<&str>) -> RuleNames {
    let comment = comment.unwrap_or_default();
    if let Some(n) = calico(chain, comment) {
        return n;
    }
    if let Some(n) = kube_router(chain, comment) {
        return n;
    }
    if chain.starts_with("antrea-") || comment.starts_with("Antrea:") {
        return RuleNames {
            owner: Some("antrea"),
            ..RuleNames::default()
        };
    }
    kube_proxy(chain, comment).unwrap_or_default()
}

/// kube-proxy: iptables chains `KUBE-*` with `ns/name:port` comments, and
/// the nftables mode's `service-HASH-ns/name/proto/port` and
/// `endpoint-HASH-ns/name/proto/port__ip/port` chains.
fn kube_proxy(chain: &str, comment: &str) -> Option<RuleNames> {
    let iptables = chain.starts_with("KUBE-");
    let nft_chain = ["service-", "endpoint-", "external-", "firewall-"]
        .iter()
        .find_map(|p| chain.strip_prefix(p));
    if let Some(rest) = nft_chain {
        // HASH-ns/name/proto/port[__ip/port]
        let (_, key) = rest.split_once('-')?;
        let (svc, endpoint) = match key.split_once("__") {
            Some((s, e)) => (s, Some(e.replacen('/', ":", 1))),
            None => (key, None),
        };
        let mut parts = svc.split('/');
        let (ns, name, _proto, port) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        return Some(RuleNames {
            owner: Some("kube-proxy"),
            namespace: Some(ns.to_owned()),
            service: Some(name.to_owned()),
            service_port: Some(port.to_owned()),
            endpoint,
            ..RuleNames::default()
        });
    }
    let mut names = RuleNames {
        owner: iptables.then_some("kube-proxy"),
        ..RuleNames::default()
    };
    // "ns/name:port", "ns/name:port cluster IP", "ns/name:port -> 10.0.0.5:80",
    // "ns/name:port has no endpoints"; an unnamed port leaves "ns/name".
    let first = comment.split(' ').next().unwrap_or_default();
    if let Some((ns, rest)) = first.split_once('/') {
        let (svc, port) = rest.split_once(':').unwrap_or((rest, ""));
        if is_dns_label(ns) && is_dns_label(svc) && (iptables || !port.is_empty()) {
            names.owner = Some("kube-proxy");
            names.namespace = Some(ns.to_owned());
            names.service = Some(svc.to_owned());
            names.service_port = (!port.is_empty()).then(|| port.to_owned());
            names.endpoint = comment
                .split_once(" -> ")
                .map(|(_, e)| e.split(' ').next().unwrap_or_default().to_owned());
        }
    }
    names.owner.is_some().then_some(names)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Calico (and Canal): `cali-*` chains; `Policy NAME DIR` and `Profile
/// NAME DIR` comments; `cali-pi-`/`cali-po-` chains named after the
/// policy when the name is short enough (else hashed, `cali-pi-_...`);
/// the endpoint chains' final drop.
fn calico(chain: &str, comment: &str) -> Option<RuleNames> {
    if !chain.starts_with("cali-") && !comment.starts_with("cali:") {
        return None;
    }
    let mut names = RuleNames {
        owner: Some("calico"),
        ..RuleNames::default()
    };
    let described = comment
        .strip_prefix("Policy ")
        .map(|r| (false, r))
        .or_else(|| comment.strip_prefix("Profile ").map(|r| (true, r)));
    let policy = match described {
        Some((profile, rest)) => Some((profile, rest.split(' ').next().unwrap_or_default())),
        None => ["cali-pi-", "cali-po-"]
            .iter()
            .find_map(|p| chain.strip_prefix(p))
            .filter(|n| !n.starts_with('_'))
            .map(|n| (false, n))
            .or_else(|| {
                ["cali-pri-", "cali-pro-"]
                    .iter()
                    .find_map(|p| chain.strip_prefix(p))
                    .filter(|n| !n.starts_with('_'))
                    .map(|n| (true, n))
            }),
    };
    match policy {
        Some((true, profile)) => {
            names.policy_kind = Some("Profile");
            // kns.NAMESPACE is a namespace's profile.
            if let Some(ns) = profile.strip_prefix("kns.") {
                names.namespace = Some(ns.to_owned());
            }
            names.policy = Some(profile.to_owned());
        }
        Some((false, policy)) if !policy.is_empty() => {
            let (ns, name) = match policy.split_once('/') {
                Some((ns, name)) => (Some(ns), name),
                None => (None, policy),
            };
            let (kind, name) = match (ns, name.strip_prefix("knp.default.")) {
                (Some(_), Some(k8s)) => ("NetworkPolicy", k8s),
                (Some(_), None) => ("CalicoNetworkPolicy", name),
                (None, _) => ("GlobalNetworkPolicy", name),
            };
            names.policy_kind = Some(kind);
            names.namespace = ns.map(str::to_owned);
            names.policy = Some(name.to_owned());
        }
        _ => {
            if comment.contains("Drop if no policies passed packet")
                || comment.contains("Drop if no profiles matched")
            {
                names.policy_kind = Some("DefaultDeny");
            }
        }
    }
    Some(names)
}

/// kube-router: `KUBE-NWPLCY-*` chains, commented "... policy name NAME
/// namespace NS".
fn kube_router(chain: &str, comment: &str) -> Option<RuleNames> {
    if !chain.starts_with("KUBE-NWPLCY-") && !chain.starts_with("KUBE-POD-FW-") {
        return None;
    }
    let mut names = RuleNames {
        owner: Some("kube-router"),
        ..RuleNames::default()
    };
    let words: Vec<&str> = comment.split_whitespace().collect();
    let after = |key: &str| {
        words
            .windows(2)
            .find(|w| w[0] == key)
            .map(|w| w[1].to_owned())
    };
    if let (Some(policy), Some(ns)) = (
        words
            .windows(3)
            .find(|w| w[0] == "policy" && w[1] == "name")
            .map(|w| w[2].to_owned()),
        after("namespace"),
    ) {
        names.policy_kind = Some("NetworkPolicy");
        names.policy = Some(policy);
        names.namespace = Some(ns);
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(n: &RuleNames) -> Vec<(&'static str, String)> {
        n.attributes()
    }

    #[test]
    fn kube_proxy_iptables_and_nftables() {
        let n = name("KUBE-SERVICES", Some("kube-system/kube-dns:dns cluster IP"));
        assert_eq!(
            shown(&n),
            vec![
                (catalogue::FIREWALL_OWNER, "kube-proxy".into()),
                (catalogue::K8S_NAMESPACE, "kube-system".into()),
                (catalogue::K8S_SERVICE, "kube-dns".into()),
                (catalogue::FIREWALL_SERVICE_PORT, "dns".into()),
            ]
        );
        let n = name(
            "KUBE-SVC-TCOU7JCQXEZGVUNU",
            Some("kube-system/kube-dns:dns -> 10.244.0.2:53"),
        );
        assert_eq!(n.endpoint.as_deref(), Some("10.244.0.2:53"));
        let n = name("KUBE-SEP-ABC", Some("default/web:"));
        assert_eq!(
            (n.service.as_deref(), n.service_port.as_deref()),
            (Some("web"), None)
        );
        let n = name("KUBE-FIREWALL", Some("block incoming localnet connections"));
        assert_eq!(n.owner, Some("kube-proxy"));
        assert_eq!(n.service, None);
        let n = name("endpoint-5OJB2KTY-default/web/tcp/http__10.0.0.5/80", None);
        assert_eq!(
            (
                n.namespace.as_deref(),
                n.service.as_deref(),
                n.service_port.as_deref(),
                n.endpoint.as_deref()
            ),
            (
                Some("default"),
                Some("web"),
                Some("http"),
                Some("10.0.0.5:80")
            )
        );
        let n = name("service-ULMVA6XW-default/web/tcp/http", None);
        assert_eq!(n.service.as_deref(), Some("web"));
        assert_eq!(n.endpoint, None);
    }

    #[test]
    fn calico_policies_and_profiles() {
        let n = name(
            "cali-pi-_AbCdEf",
            Some("Policy default/knp.default.deny-all ingress"),
        );
        assert_eq!(
            (n.policy_kind, n.namespace.as_deref(), n.policy.as_deref()),
            (Some("NetworkPolicy"), Some("default"), Some("deny-all"))
        );
        let n = name("cali-po-default.allow-db", None);
        assert_eq!(
            (n.policy_kind, n.policy.as_deref()),
            (Some("GlobalNetworkPolicy"), Some("default.allow-db"))
        );
        let n = name("cali-pi-_x", Some("Policy prod/default.allow-web ingress"));
        assert_eq!(
            (n.policy_kind, n.namespace.as_deref()),
            (Some("CalicoNetworkPolicy"), Some("prod"))
        );
        let n = name("cali-pri-kns.prod", None);
        assert_eq!(
            (n.policy_kind, n.namespace.as_deref()),
            (Some("Profile"), Some("prod"))
        );
        let n = name(
            "cali-tw-cali1234",
            Some("Drop if no policies passed packet"),
        );
        assert_eq!(n.policy_kind, Some("DefaultDeny"));
    }

    #[test]
    fn kube_router_and_unknown() {
        let n = name(
            "KUBE-NWPLCY-ABC",
            Some("rule to ACCEPT traffic from source pods to dest pods selected by policy name allow-web namespace prod"),
        );
        assert_eq!(
            (n.owner, n.policy.as_deref(), n.namespace.as_deref()),
            (Some("kube-router"), Some("allow-web"), Some("prod"))
        );
        assert_eq!(name("INPUT", Some("ssh")), RuleNames::default());
        assert_eq!(name("input", Some("a/b c")), RuleNames::default());
    }
}
