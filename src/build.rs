//! The commit the binary is built from, for `--version`: `git rev-parse --short HEAD`
//! when the source is a git checkout, else `STREAM_RELAY_COMMIT` from the environment
//! (a container build without `.git` can pass it), else `unknown`.

use std::process::Command;

fn main() {
    let given = std::env::var("STREAM_RELAY_COMMIT").ok();
    let commit = given.filter(|c| !c.is_empty()).or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|c| !c.is_empty())
    });
    println!(
        "cargo:rustc-env=STREAM_RELAY_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
    println!("cargo:rerun-if-env-changed=STREAM_RELAY_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
