//! The crate's examples as executables, for tests that run them as child
//! processes (`CARGO_BIN_EXE_*` exists only for `[[bin]]` targets).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The executable of example `name`, built on first use with the same
/// profile and features as the running test (so the library is not built
/// twice), at the path cargo reports (which follows `CARGO_TARGET_DIR`).
pub fn example_binary(name: &str) -> &'static Path {
    static BUILT: OnceLock<Mutex<HashMap<String, &'static Path>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = built.get(name) {
        return path;
    }
    let started = Instant::now();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "--example", name])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .stdin(Stdio::null());
    if !cfg!(debug_assertions) {
        cargo.arg("--release");
    }
    let features: Vec<&str> = [
        ("tls", cfg!(feature = "tls")),
        ("cli", cfg!(feature = "cli")),
    ]
    .into_iter()
    .filter_map(|(feature, on)| on.then_some(feature))
    .collect();
    if !features.is_empty() {
        cargo.arg("--features").arg(features.join(","));
    }
    let output = cargo.output().expect("cannot run cargo");
    assert!(
        output.status.success(),
        "cargo build --example {name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .filter(|line| {
            line.contains(r#""reason":"compiler-artifact""#)
                && line.contains(r#""kind":["example"]"#)
                && line.contains(&format!(r#""name":"{name}""#))
        })
        .find_map(|line| json_string_after(line, r#""executable":""#))
        .unwrap_or_else(|| panic!("no executable for the {name} example in:\n{stdout}"));
    eprintln!("{name} example built in {:?}", started.elapsed());
    let path: &'static Path = Box::leak(PathBuf::from(path).into_boxed_path());
    built.insert(name.to_owned(), path);
    path
}

/// The JSON string that starts right after `marker`, unescaped.
fn json_string_after(line: &str, marker: &str) -> Option<String> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let mut out = String::new();
    let mut chars = rest.chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
}
