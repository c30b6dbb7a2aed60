//! What every component shares: the one error its settings' validation
//! returns, naming the key that holds the problem so an operator reading
//! `kubectl logs` knows what to change.

use std::fmt;

/// A configuration problem, tied to the key (or variable) that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The dotted key (`export.otlp.timeout`), a variable
    /// (`OTEL_EXPORTER_OTLP_PROTOCOL`) or a flag (`--config`).
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The same error under the section `prefix` (a component validates its
    /// own keys; the loader says where its section is).
    pub fn within(self, prefix: &str) -> Self {
        Self {
            key: format!("{prefix}.{}", self.key),
            reason: self.reason,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration at `{}`: {}",
            self.key, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// An error at `key` when `value` is zero.
pub fn positive(key: &str, value: std::time::Duration, example: &str) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::new(
            key,
            format!("must be greater than 0, e.g. {example:?}"),
        ));
    }
    Ok(())
}
