//! Embeds build facts for `GET /api/v1/info`: git commit and branch, the CI build number
//! (`TRELLIS_BUILD_NUMBER` at build time, else `local`) and the build time (honouring
//! `SOURCE_DATE_EPOCH` for reproducible builds).

use std::{
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let branch = git(&["rev-parse", "--abbrev-ref", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let build_number = std::env::var("TRELLIS_BUILD_NUMBER").unwrap_or_else(|_| "local".into());
    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap_or_else(SystemTime::now);

    println!("cargo:rustc-env=TRELLIS_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=TRELLIS_GIT_BRANCH={branch}");
    println!("cargo:rustc-env=TRELLIS_BUILD_NUMBER={build_number}");
    println!(
        "cargo:rustc-env=TRELLIS_BUILD_TIME={}",
        humantime::format_rfc3339_seconds(built)
    );
    println!("cargo:rerun-if-env-changed=TRELLIS_BUILD_NUMBER");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={git_dir}/{head_ref}");
        }
    }
}
