//! [`ConfigError`]: what is wrong with a configuration, by field.
//!
//! At the bottom of the crate: every policy validates itself and names its
//! fields with it.

use std::fmt;

/// An invalid configuration value. [`ConfigError::field`] names it the way the
/// builder and config files do (e.g. `retry.max_attempts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    message: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError {
            field,
            message: message.into(),
        }
    }

    /// The offending field.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid upstream-guard configuration: `{}` {}",
            self.field, self.message
        )
    }
}

impl std::error::Error for ConfigError {}
