//! Builds an [`UpstreamGuardLayer`] from a TOML config file and prints the
//! effective settings: what was in the file, with the library defaults filled in.
//!
//! ```text
//! cargo run --example from_config --features serde                 # examples/config.toml
//! cargo run --example from_config --features serde -- guard.toml   # your own file
//! ```
//!
//! A file that does not parse (unknown key, wrong type, bad duration) or holds
//! an invalid value (e.g. `max_attempts = 0`) prints the error, naming the key,
//! and exits with status 2, so it can check config files in CI or a deploy step.

use std::path::PathBuf;
use std::process::ExitCode;

use upstream_guard::{GuardConfig, UpstreamGuardLayer};

/// Why the configuration could not be used; printed as is.
type Error = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let path = match (args.next(), args.next()) {
        (None, _) => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config.toml")),
        (Some(arg), None) if arg == "-h" || arg == "--help" => {
            println!("usage: from_config [CONFIG.toml]  (default: examples/config.toml)");
            return ExitCode::SUCCESS;
        }
        (Some(path), None) => PathBuf::from(path),
        (Some(_), Some(_)) => {
            eprintln!("usage: from_config [CONFIG.toml]");
            return ExitCode::from(2);
        }
    };
    match run(&path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}: {err}", path.display());
            ExitCode::from(2)
        }
    }
}

fn run(path: &std::path::Path) -> Result<(), Error> {
    let text = std::fs::read_to_string(path)?;
    let config: GuardConfig = toml::from_str(&text)?;
    // `Debug` of a builder shows every setting, defaults included. Print it only
    // once `from_config` has validated the values (and named any bad key).
    let effective = format!("{:#?}", config.clone().into_builder());
    let layer = UpstreamGuardLayer::from_config(config)?;
    println!("{}: valid", path.display());
    println!("effective settings:\n{effective}");
    match layer.breaker_handle() {
        Some(handle) => println!("circuit breaker: on ({:?})", handle.mode()),
        None => println!("circuit breaker: off"),
    }
    Ok(())
}
