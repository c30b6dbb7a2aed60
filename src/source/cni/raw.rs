//! What `bpf/cni.bpf.c` sends through its ring buffer, decoded, and what
//! a plugin's environment and stdout say. Nothing here trusts the bytes:
//! a short record is an error, a malformed environment or result leaves
//! the fields it would have filled empty.

use std::net::IpAddr;

/// `FT_PATH_MAX`, `FT_ENV_MAX` and `FT_OUT_MAX` of the C side.
const PATH_MAX: usize = 256;
const ENV_MAX: usize = 16384;
const OUT_MAX: usize = 4096;
const HEADER_LEN: usize = 32;

const KIND_EXEC: u32 = 1;
const KIND_OUTPUT: u32 = 2;
const KIND_EXIT: u32 = 3;

/// One ring-buffer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    Exec {
        pid: u32,
        ppid: u32,
        ts_ns: u64,
        path: String,
        env: Vec<u8>,
        /// The environment was longer than the kernel copies: `env` is
        /// its head, ending mid-variable.
        env_truncated: bool,
    },
    Output {
        pid: u32,
        data: Vec<u8>,
    },
    Exit {
        pid: u32,
        ts_ns: u64,
        /// The wait status (`exit_code` of the task).
        status: i32,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

/// Decodes one record; the error says what was wrong with it.
pub fn decode(b: &[u8]) -> Result<RawEvent, String> {
    if b.len() < HEADER_LEN {
        return Err(format!(
            "a {}-byte record is shorter than its header",
            b.len()
        ));
    }
    let kind = u32_at(b, 0);
    let pid = u32_at(b, 4);
    let ppid = u32_at(b, 8);
    let status = u32_at(b, 12) as i32;
    let ts_ns = u64_at(b, 16);
    let len = u32_at(b, 24) as usize;
    let truncated = u32_at(b, 28) != 0;
    let payload = &b[HEADER_LEN..];
    match kind {
        KIND_EXEC => {
            if len >= ENV_MAX || payload.len() < PATH_MAX + len {
                return Err(format!(
                    "an exec record of {} bytes, env length {len}",
                    b.len()
                ));
            }
            let path = &payload[..PATH_MAX];
            let path = &path[..path.iter().position(|&c| c == 0).unwrap_or(PATH_MAX)];
            Ok(RawEvent::Exec {
                pid,
                ppid,
                ts_ns,
                path: String::from_utf8_lossy(path).into_owned(),
                env: payload[PATH_MAX..PATH_MAX + len].to_vec(),
                env_truncated: truncated,
            })
        }
        KIND_OUTPUT => {
            if payload.len() < OUT_MAX || len > OUT_MAX {
                return Err(format!(
                    "an output record of {} bytes, length {len}",
                    b.len()
                ));
            }
            Ok(RawEvent::Output {
                pid,
                data: payload[..len].to_vec(),
            })
        }
        KIND_EXIT => Ok(RawEvent::Exit { pid, ts_ns, status }),
        other => Err(format!("unknown record kind {other}")),
    }
}

/// What libcni tells a plugin through its environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

/// Reads the CNI variables from a `\0`-separated environment. When
/// `truncated`, the last entry is a fragment and skipped. A later
/// definition wins, as it does for the plugin.
pub fn parse_env(env: &[u8], truncated: bool) -> CniEnv {
    let mut out = CniEnv::default();
    let mut entries: Vec<&[u8]> = env.split(|&c| c == 0).collect();
    if truncated {
        entries.pop();
    }
    for entry in entries {
        let Ok(entry) = std::str::from_utf8(entry) else {
            continue;
        };
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        let value = Some(value.to_owned()).filter(|v| !v.is_empty());
        match key {
            "CNI_COMMAND" => out.command = value,
            "CNI_CONTAINERID" => out.container_id = value,
            "CNI_NETNS" => out.netns = value,
            "CNI_IFNAME" => out.ifname = value,
            "CNI_ARGS" => {
                for arg in value.as_deref().unwrap_or_default().split(';') {
                    let Some((k, v)) = arg.split_once('=') else {
                        continue;
                    };
                    let v = Some(v.to_owned()).filter(|v| !v.is_empty());
                    match k {
                        "K8S_POD_NAMESPACE" => out.pod_namespace = v,
                        "K8S_POD_NAME" => out.pod_name = v,
                        "K8S_POD_UID" => out.pod_uid = v,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The command as an attribute value: the six the specification names,
/// anything else `other` (so series stay few).
pub fn command_name(command: Option<&str>) -> &'static str {
    match command {
        Some("ADD") => "ADD",
        Some("DEL") => "DEL",
        Some("CHECK") => "CHECK",
        Some("VERSION") => "VERSION",
        Some("GC") => "GC",
        Some("STATUS") => "STATUS",
        Some(_) => "other",
        None => "unknown",
    }
}

/// One address of an ADD result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultIp {
    /// `address` as written: an address with its prefix length.
    pub address: String,
    pub gateway: Option<IpAddr>,
}

/// What a plugin printed on stdout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginOutput {
    pub ips: Vec<ResultIp>,
    /// The error's `code`, `msg` and `details` (`msg: details`).
    pub error_code: Option<i64>,
    pub error: Option<String>,
}

/// Reads a plugin's stdout: an ADD result (`ips`, spec 0.3+; `ip4`/`ip6`
/// of 0.2) or an error object. Anything else gives an empty output.
pub fn parse_output(data: &[u8]) -> PluginOutput {
    let mut out = PluginOutput::default();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return out;
    };
    if let Some(msg) = value.get("msg").and_then(|m| m.as_str()) {
        out.error_code = value.get("code").and_then(|c| c.as_i64());
        out.error = Some(match value.get("details").and_then(|d| d.as_str()) {
            Some(d) if !d.is_empty() => format!("{msg}: {d}"),
            _ => msg.to_owned(),
        });
        return out;
    }
    let mut push = |ip: &serde_json::Value| {
        if let Some(address) = ip.get("address").and_then(|a| a.as_str()) {
            out.ips.push(ResultIp {
                address: address.to_owned(),
                gateway: ip
                    .get("gateway")
                    .and_then(|g| g.as_str())
                    .and_then(|g| g.parse().ok()),
            });
        }
    };
    if let Some(ips) = value.get("ips").and_then(|i| i.as_array()) {
        ips.iter().for_each(&mut push);
    }
    for old in ["ip4", "ip6"] {
        if let Some(ip) = value.get(old).and_then(|i| i.get("ip").map(|_| i)) {
            let v = serde_json::json!({"address": ip.get("ip"), "gateway": ip.get("gateway")});
            push(&v);
        }
    }
    out
}

/// The exit code of a wait status, or the signal that ended the process
/// (as a negative number).
pub fn exit_code(status: i32) -> i64 {
    let signal = status & 0x7f;
    if signal == 0 {
        i64::from((status >> 8) & 0xff)
    } else {
        -i64::from(signal)
    }
}

/// The plugin's name: the file name of the binary.
pub fn plugin_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(kind: u32, pid: u32, len: u32, payload: &[u8], total: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b.extend_from_slice(&7u32.to_ne_bytes());
        b.extend_from_slice(&256i32.to_ne_bytes());
        b.extend_from_slice(&99u64.to_ne_bytes());
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(HEADER_LEN + total, 0);
        b
    }

    #[test]
    fn decodes_exec_output_and_exit_and_rejects_short_records() {
        let mut payload = vec![0u8; PATH_MAX];
        payload[..11].copy_from_slice(b"/x/cni/host");
        payload.extend_from_slice(b"A=1\0B=2");
        let exec = decode(&record(KIND_EXEC, 5, 7, &payload, PATH_MAX + 7)).unwrap();
        assert_eq!(
            exec,
            RawEvent::Exec {
                pid: 5,
                ppid: 7,
                ts_ns: 99,
                path: "/x/cni/host".into(),
                env: b"A=1\0B=2".to_vec(),
                env_truncated: false,
            }
        );
        let out = decode(&record(KIND_OUTPUT, 5, 2, b"{}", OUT_MAX)).unwrap();
        assert_eq!(
            out,
            RawEvent::Output {
                pid: 5,
                data: b"{}".to_vec()
            }
        );
        let exit = decode(&record(KIND_EXIT, 5, 0, &[], 0)).unwrap();
        assert_eq!(
            exit,
            RawEvent::Exit {
                pid: 5,
                ts_ns: 99,
                status: 256
            }
        );
        assert!(decode(&[0; 8]).is_err());
        assert!(decode(&record(KIND_EXEC, 5, 7, &[], 10)).is_err());
        assert!(decode(&record(KIND_OUTPUT, 5, 9000, &[], OUT_MAX)).is_err());
        assert!(decode(&record(9, 5, 0, &[], 0)).is_err());
    }

    #[test]
    fn env_gives_the_cni_variables_and_the_pod() {
        let env = b"PATH=/bin\0CNI_COMMAND=ADD\0CNI_CONTAINERID=abc\0CNI_NETNS=/run/netns/p\0\
CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1\0CNI_IFNAME=eth0\0CNI_PATH=/opt/cni/bin\0CNI_IFNAME=et";
        let parsed = parse_env(env, true);
        assert_eq!(
            parsed,
            CniEnv {
                command: Some("ADD".into()),
                container_id: Some("abc".into()),
                netns: Some("/run/netns/p".into()),
                ifname: Some("eth0".into()),
                pod_namespace: Some("shop".into()),
                pod_name: Some("web-0".into()),
                pod_uid: Some("u-1".into()),
            }
        );
        assert_eq!(parse_env(b"\xff\xfe\0junk", false), CniEnv::default());
        assert_eq!(command_name(Some("FOO")), "other");
        assert_eq!(command_name(None), "unknown");
    }

    #[test]
    fn output_gives_the_ips_or_the_error() {
        let ok = br#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.0.2/24","gateway":"10.1.0.1","interface":0}]}"#;
        assert_eq!(
            parse_output(ok).ips,
            vec![ResultIp {
                address: "10.1.0.2/24".into(),
                gateway: Some("10.1.0.1".parse().unwrap()),
            }]
        );
        let err = br#"{"code":999,"msg":"failed to allocate for range 0","details":"no IP addresses available"}"#;
        let out = parse_output(err);
        assert_eq!(out.error_code, Some(999));
        assert_eq!(
            out.error.as_deref(),
            Some("failed to allocate for range 0: no IP addresses available")
        );
        let old = br#"{"ip4":{"ip":"10.2.0.5/16","gateway":"10.2.0.1"}}"#;
        assert_eq!(parse_output(old).ips[0].address, "10.2.0.5/16");
        assert_eq!(parse_output(b"not json"), PluginOutput::default());
    }

    #[test]
    fn wait_status_and_plugin_name() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(1 << 8), 1);
        assert_eq!(exit_code(9), -9);
        assert_eq!(plugin_name("/opt/cni/bin/bridge"), "bridge");
    }
}
