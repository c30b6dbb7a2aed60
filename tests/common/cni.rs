//! Runs real CNI plugins the way a container runtime does through libcni
//! (`containernetworking/cni/libcni`): for ADD each plugin of the conflist
//! in order, for CHECK in order and for DEL in reverse, each with the
//! network's `name` and `cniVersion` and the previous result injected into
//! its configuration on stdin, and the `CNI_*` variables added to the
//! runtime's own environment (libcni's `Args.AsEnv`; its `dedupEnv` goes
//! through a map, so where they land is arbitrary: here they come last,
//! passed in that order through `env -i`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// One network: its conflist and where its plugins are.
pub struct CniNetwork {
    pub bin_dir: PathBuf,
    pub conflist: Value,
    /// Put before the `CNI_*` variables, as a runtime's own environment
    /// would be (a long one makes the kernel read only the tail).
    pub padding: Vec<(String, String)>,
}

/// One pod's attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// One plugin execution as the runner saw it.
#[derive(Debug, Clone)]
pub struct Ran {
    pub plugin: String,
    pub command: &'static str,
    pub success: bool,
    pub stdout: String,
}

impl CniNetwork {
    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// libcni's `buildOneConfig`: the plugin's object with the network's
    /// name and version, and `prevResult` when there is one.
    fn config(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// Executes one plugin; its stdout, and whether it exited 0.
    pub fn exec(
        &self,
        plugin: &Value,
        command: &'static str,
        at: &Attachment,
        prev: Option<&Value>,
        log: &mut Vec<Ran>,
    ) -> Ran {
        let kind = plugin["type"].as_str().unwrap_or_default().to_owned();
        let path = self.bin_dir.join(&kind);
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            at.pod_namespace, at.pod_name, at.container_id, at.pod_uid
        );
        let mut env: Vec<String> = self
            .padding
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push(format!(
            "PATH={}",
            std::env::var("PATH").unwrap_or_default()
        ));
        env.extend([
            format!("CNI_COMMAND={command}"),
            format!("CNI_CONTAINERID={}", at.container_id),
            format!("CNI_NETNS={}", at.netns.display()),
            format!("CNI_ARGS={args}"),
            format!("CNI_IFNAME={}", at.ifname),
            format!("CNI_PATH={}", self.bin_dir.display()),
        ]);
        let conf = self.config(plugin, prev).to_string();
        let mut child = Command::new("/usr/bin/env")
            .arg("-i")
            .args(&env)
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that fails early may not read it all.
            let _ = stdin.write_all(conf.as_bytes());
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", path.display()));
        let ran = Ran {
            plugin: kind,
            command,
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        };
        log.push(ran.clone());
        ran
    }

    /// ADD through the chain; the last result (the runtime caches it), or
    /// the failing plugin's output.
    pub fn add(&self, at: &Attachment, log: &mut Vec<Ran>) -> Result<Value, String> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let ran = self.exec(&plugin, "ADD", at, prev.as_ref(), log);
            if !ran.success {
                return Err(ran.stdout);
            }
            prev = Some(serde_json::from_str(&ran.stdout).map_err(|e| e.to_string())?);
        }
        prev.ok_or_else(|| "empty conflist".to_owned())
    }

    /// CHECK through the chain with the cached ADD result.
    pub fn check(&self, at: &Attachment, cached: &Value, log: &mut Vec<Ran>) -> Result<(), String> {
        for plugin in self.plugins() {
            let ran = self.exec(&plugin, "CHECK", at, Some(cached), log);
            if !ran.success {
                return Err(ran.stdout);
            }
        }
        Ok(())
    }

    /// DEL through the chain in reverse, with the cached ADD result.
    pub fn del(
        &self,
        at: &Attachment,
        cached: Option<&Value>,
        log: &mut Vec<Ran>,
    ) -> Result<(), String> {
        for plugin in self.plugins().iter().rev() {
            let ran = self.exec(plugin, "DEL", at, cached, log);
            if !ran.success {
                return Err(ran.stdout);
            }
        }
        Ok(())
    }
}

/// Deletes a host link (the bridge a plugin made) when dropped.
pub struct LinkGuard {
    pub ip: PathBuf,
    pub name: String,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = Command::new(&self.ip)
            .args(["link", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Where Debian's containernetworking-plugins puts the plugins, if its
/// `bridge` is there.
pub fn debian_plugins() -> Option<PathBuf> {
    let dir = Path::new("/usr/lib/cni");
    dir.join("bridge").is_file().then(|| dir.to_path_buf())
}

/// How long a test gives flowtel to show what the plugins did.
pub const SHOW_TIMEOUT: Duration = Duration::from_secs(30);
