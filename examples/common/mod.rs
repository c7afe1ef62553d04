//! What the `gateway` and `drain` examples share: how the flags name the
//! target, logging, and the stop signals. Not an example itself (cargo only
//! builds `examples/*.rs` and `examples/*/main.rs`); each example includes it
//! with `#[path = "common/mod.rs"] mod common;`.

use std::io::IsTerminal;

use tower_heartbeat_buffer::{InvalidName, Target};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// The target named by `--heartbeat-key KEY` or `--service NAME` (clap makes
/// sure exactly one is given), in `namespace`.
pub fn target_from_flags(
    namespace: &str,
    heartbeat_key: Option<&str>,
    service: Option<&str>,
) -> Result<Target, InvalidName> {
    match (heartbeat_key, service) {
        (Some(key), _) => {
            Target::with_namespace(namespace, &target_name_for_key(key))?.with_heartbeat_key(key)
        }
        (None, Some(name)) => Target::with_namespace(namespace, name),
        (None, None) => unreachable!("clap requires one of --heartbeat-key, --service"),
    }
}

/// The buffer's target name for an explicit heartbeat key, the same in every
/// process started with the same key, so that they all share one buffer.
///
/// Rule: a key that is already a valid target name (at most 200 bytes, none
/// of `* ? [ ] \ { }`, no whitespace or control character) is the name as
/// is. Otherwise each invalid character becomes `_`, the result is cut to
/// 183 bytes, and `-` plus the 16 hex digits of the FNV-1a 64 hash of the
/// key's bytes is appended (so distinct keys keep distinct names).
pub fn target_name_for_key(key: &str) -> String {
    let invalid = |c: char| "*?[]\\{}".contains(c) || c.is_whitespace() || c.is_control();
    if key.len() <= 200 && !key.chars().any(invalid) {
        return key.to_owned();
    }
    let mut name = String::new();
    for c in key.chars().map(|c| if invalid(c) { '_' } else { c }) {
        if name.len() + c.len_utf8() > 183 {
            break;
        }
        name.push(c);
    }
    format!("{name}-{:016x}", fnv1a64(key.as_bytes()))
}

/// FNV-1a, 64 bits: stable across Rust versions and platforms, unlike std's hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Logs to stderr, filtered by `$RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed now,
/// not when the future is first polled.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            info!("{name}: shutting down");
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        info!("Ctrl-C: shutting down");
    })
}
