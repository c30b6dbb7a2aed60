//! Malformed configuration must stop flowtel with a non-zero exit and a
//! message naming the key (or variable) at fault, never a panic.
//!
//! Each run has [`CASE_TIMEOUT`]: a case that does not exit (a key whose
//! check went missing lets `run` start for real) is killed and fails
//! naming the case, and the other cases still run.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long one case may take. A refused configuration exits in
/// milliseconds; this leaves room for a loaded machine.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `cmd` to its end, or kills it after `timeout` and says which
/// case it was.
fn output_within(name: &str, mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name}: cannot start {cmd:?}: {e}"))?;
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        // The receiver may be gone after a timeout; nothing to tell then.
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(timeout) {
        Ok(result) => {
            let _ = waiter.join();
            result.map_err(|e| format!("{name}: waiting for the process: {e}"))
        }
        Err(_) => {
            // Still running: kill it (SIGKILL, by the pid of the child
            // this test started, not yet reaped: the waiter holds it), then
            // let the waiter reap it.
            // SAFETY: kill(2) with a pid and a signal number; no memory
            // is shared.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let _ = waiter.join();
            Err(format!(
                "{name}: no exit within {timeout:?}; killed (pid {pid})"
            ))
        }
    }
}

struct Case {
    name: &'static str,
    yaml: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    key: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "DNS log records neither off, failed nor all",
        yaml: Some("export:\n  logs:\n    dns: sometimes\n"),
        env: &[],
        key: "`export.logs.dns`",
    },
    Case {
        name: "DNS lookup sampling above 1",
        yaml: None,
        env: &[("FLOWTEL_EXPORT__LOGS__DNS_SAMPLING", "2")],
        key: "`export.logs.dns_sampling`",
    },
    Case {
        name: "zero interval",
        yaml: Some("interval: 0s\n"),
        env: &[],
        key: "`interval`",
    },
    Case {
        name: "interval not a duration",
        yaml: Some("interval: soon\n"),
        env: &[],
        key: "`interval`",
    },
    Case {
        name: "unknown top-level key",
        yaml: Some("intervall: 10s\n"),
        env: &[],
        key: "`intervall`",
    },
    Case {
        name: "unknown nested key",
        yaml: Some("export:\n  otlp:\n    endpiont: http://x:4317\n"),
        env: &[],
        key: "`export.otlp.endpiont`",
    },
    Case {
        name: "endpoint not a URL",
        yaml: Some("export:\n  otlp:\n    endpoint: collector\n"),
        env: &[],
        key: "`export.otlp.endpoint`",
    },
    Case {
        name: "endpoint with a foreign scheme",
        yaml: Some("export:\n  otlp:\n    endpoint: ftp://collector:4317\n"),
        env: &[],
        key: "`export.otlp.endpoint`",
    },
    Case {
        name: "wrong type for max_flows",
        yaml: Some("flows:\n  max_flows: many\n"),
        env: &[],
        key: "`flows.max_flows`",
    },
    Case {
        name: "series budget too small",
        yaml: Some("flows:\n  max_series: 1\n"),
        env: &[],
        key: "`flows.max_series`",
    },
    Case {
        name: "an anomaly threshold of 1",
        yaml: Some("flows:\n  anomaly:\n    scan_ports: 1\n"),
        env: &[],
        key: "`flows.anomaly.scan_ports`",
    },
    Case {
        name: "a spike factor that is no factor",
        yaml: Some("flows:\n  anomaly:\n    spike_factor: 0.5\n"),
        env: &[],
        key: "`flows.anomaly.spike_factor`",
    },
    Case {
        name: "an error ratio above 1",
        yaml: None,
        env: &[("FLOWTEL_FLOWS__ANOMALY__ERROR_RATIO", "2")],
        key: "`flows.anomaly.error_ratio`",
    },
    Case {
        name: "port 0 as a lateral port",
        yaml: Some("flows:\n  anomaly:\n    lateral_ports: [5432, 0]\n"),
        env: &[],
        key: "`flows.anomaly.lateral_ports`",
    },
    Case {
        name: "no anomaly keys tracked",
        yaml: None,
        env: &[("FLOWTEL_FLOWS__ANOMALY__MAX_TRACKED", "0")],
        key: "`flows.anomaly.max_tracked`",
    },
    Case {
        name: "unknown key field",
        yaml: Some("flows:\n  key: [server_port, pod]\n"),
        env: &[],
        key: "`flows.key",
    },
    Case {
        name: "unknown protocol",
        yaml: Some("export:\n  otlp:\n    protocol: udp\n"),
        env: &[],
        key: "`export.otlp.protocol`",
    },
    Case {
        name: "half of mutual TLS",
        yaml: Some("export:\n  otlp:\n    tls:\n      cert_file: /etc/hostname\n"),
        env: &[],
        key: "`export.otlp.tls.key_file`",
    },
    Case {
        name: "missing CA file",
        yaml: Some("export:\n  otlp:\n    tls:\n      ca_file: /nonexistent/ca.pem\n"),
        env: &[],
        key: "`export.otlp.tls.ca_file`",
    },
    Case {
        name: "bad health address",
        yaml: Some("health:\n  listen: localhost\n"),
        env: &[],
        key: "`health.listen`",
    },
    Case {
        name: "invalid YAML",
        yaml: Some("interval: [10s\n"),
        env: &[],
        key: "`--config`",
    },
    Case {
        name: "negative retry attempts",
        yaml: Some("export:\n  otlp:\n    retry:\n      max_attempts: -1\n"),
        env: &[],
        key: "`export.otlp.retry.max_attempts`",
    },
    Case {
        name: "zero total retry time",
        yaml: Some("export:\n  otlp:\n    retry:\n      max_elapsed_time: 0s\n"),
        env: &[],
        key: "`export.otlp.retry.max_elapsed_time`",
    },
    Case {
        name: "http json protocol",
        yaml: Some("export:\n  otlp:\n    protocol: http/json\n"),
        env: &[],
        key: "`export.otlp.protocol`",
    },
    Case {
        name: "OTEL insecure variable",
        yaml: None,
        env: &[("OTEL_EXPORTER_OTLP_INSECURE", "maybe")],
        key: "`OTEL_EXPORTER_OTLP_INSECURE`",
    },
    Case {
        name: "OTEL protocol variable",
        yaml: None,
        env: &[("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")],
        key: "`OTEL_EXPORTER_OTLP_PROTOCOL`",
    },
    Case {
        name: "OTEL timeout variable",
        yaml: None,
        env: &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")],
        key: "`OTEL_EXPORTER_OTLP_TIMEOUT`",
    },
    Case {
        name: "OTEL headers variable",
        yaml: None,
        env: &[("OTEL_EXPORTER_OTLP_HEADERS", "authorization")],
        key: "`OTEL_EXPORTER_OTLP_HEADERS`",
    },
    Case {
        name: "OTEL metrics endpoint variable",
        yaml: None,
        env: &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "::not-a-url")],
        key: "`export.otlp.metrics.endpoint`",
    },
    Case {
        name: "FLOWTEL variable of the wrong type",
        yaml: None,
        env: &[("FLOWTEL_FLOWS__MAX_SERIES", "lots")],
        key: "`flows.max_series`",
    },
    Case {
        name: "unknown FLOWTEL variable",
        yaml: None,
        env: &[("FLOWTEL_SOURCES", "ebpf")],
        key: "FLOWTEL_SOURCES",
    },
    Case {
        name: "unknown source",
        yaml: Some("source: pcap\n"),
        env: &[],
        key: "`source`",
    },
    Case {
        name: "unknown ebpf nat mode",
        yaml: Some("ebpf:\n  nat: iptables\n"),
        env: &[],
        key: "`ebpf.nat`",
    },
    Case {
        name: "no room for NAT translations",
        yaml: Some("ebpf:\n  nat_max_entries: 0\n"),
        env: &[],
        key: "`ebpf.nat_max_entries`",
    },
    Case {
        name: "scrape timeout longer than the interval",
        yaml: Some("mesh:\n  istio:\n    interval: 5s\n    timeout: 10s\n"),
        env: &[],
        key: "`mesh.istio.timeout`",
    },
    Case {
        name: "scrape series budget zero",
        yaml: Some("mesh:\n  felix:\n    max_series: 0\n"),
        env: &[],
        key: "`mesh.felix.max_series`",
    },
    Case {
        name: "felix url not http",
        yaml: Some("mesh:\n  felix:\n    url: felix:9091\n"),
        env: &[],
        key: "`mesh.felix.url`",
    },
    Case {
        name: "hubble enabled not a choice",
        yaml: Some("hubble:\n  enabled: sometimes\n"),
        env: &[],
        key: "`hubble.enabled`",
    },
    Case {
        name: "unknown detect key",
        yaml: Some("detect:\n  cni_directory: /etc/cni\n"),
        env: &[],
        key: "`detect.cni_directory`",
    },
    Case {
        name: "kubernetes cache bound zero",
        yaml: Some("kubernetes:\n  max_objects: 0\n"),
        env: &[],
        key: "`kubernetes.max_objects`",
    },
    Case {
        name: "firewall series budget zero",
        yaml: Some("firewall:\n  max_series: 0\n"),
        env: &[],
        key: "`firewall.max_series`",
    },
    Case {
        name: "firewall xtables not a choice",
        yaml: None,
        env: &[("FLOWTEL_FIREWALL__XTABLES", "maybe")],
        key: "`firewall.xtables`",
    },
    Case {
        name: "firewall save program empty",
        yaml: Some("firewall:\n  iptables_legacy_save: \"\"\n"),
        env: &[],
        key: "`firewall.iptables_legacy_save`",
    },
];

fn run(subcommand: &str, case: &Case, dir: &std::path::Path) -> Result<Output, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowtel"));
    cmd.arg(subcommand);
    if let Some(yaml) = case.yaml {
        let file = dir.join(format!("{}.yaml", case.name.replace(' ', "_")));
        std::fs::write(&file, yaml).expect("write config");
        cmd.arg("--config").arg(file);
    }
    // A clean environment: only what the case sets (and PATH).
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in case.env {
        cmd.env(k, v);
    }
    output_within(
        &format!("case {:?} ({subcommand})", case.name),
        cmd,
        CASE_TIMEOUT,
    )
}

#[test]
fn every_bad_config_names_its_key_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(CASES.len() >= 10);
    let mut failures = Vec::new();
    for case in CASES {
        for subcommand in ["check-config", "run"] {
            let out = match run(subcommand, case, dir.path()) {
                Ok(out) => out,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            let stderr = String::from_utf8_lossy(&out.stderr);
            let ok = out.status.code() == Some(2)
                && stderr.contains(case.key)
                && !stderr.contains("panicked")
                && !stderr.contains("RUST_BACKTRACE");
            if !ok {
                failures.push(format!(
                    "{} ({subcommand}): exit {:?}, expected 2 and a message naming {}; stderr: {}",
                    case.name,
                    out.status.code(),
                    case.key,
                    stderr.trim()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The timeout itself: a process that never exits is killed at the
/// timeout and reported under the case's name, and is gone afterwards.
#[test]
fn a_hanging_case_is_killed_and_named() {
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    let started = std::time::Instant::now();
    let err = output_within("case \"hangs\" (run)", cmd, Duration::from_millis(300))
        .expect_err("sleep 1000 does not exit in 300 ms");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    assert!(
        err.starts_with("case \"hangs\" (run): no exit within 300ms; killed (pid "),
        "{err}"
    );
    let pid = err
        .rsplit_once("pid ")
        .and_then(|(_, p)| p.strip_suffix(')'))
        .expect("the pid in the message");
    // Killed and reaped: no such process (not even a zombie).
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is still there"
    );
    // A process that exits in time gives its output.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo out; echo err >&2; exit 2"]);
    let out = output_within("quick", cmd, CASE_TIMEOUT).expect("exits in time");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn a_good_config_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("good.yaml");
    std::fs::write(
        &file,
        "interval: 5s\nexport:\n  otlp:\n    endpoint: http://127.0.0.1:4317\n    headers:\n      x-tenant: a\nflows:\n  key: [server_address, server_port, transport, direction]\n",
    )
    .expect("write");
    // A clean environment: the test runner's variables are not settings.
    let out = Command::new(env!("CARGO_BIN_EXE_flowtel"))
        .args(["check-config", "--config"])
        .arg(&file)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"interval\": \"5s\""),
        "effective settings printed: {stdout}"
    );
}

/// `FLOWTEL_CONFIG` names the file, as `--config` does, and is not taken
/// for a configuration key (it once failed with "unknown field `config`").
#[test]
fn the_config_file_can_come_from_flowtel_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("from-env.yaml");
    std::fs::write(&file, "interval: 7s\nflows:\n  max_series: 123\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_flowtel"))
        .arg("check-config")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLOWTEL_CONFIG", &file)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"interval\": \"7s\"") && stdout.contains("\"max_series\": 123"),
        "the file's settings are in force: {stdout}"
    );
}
