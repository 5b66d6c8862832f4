//! Test support shared by the crates of the blockexportd workspace (a path dev-dependency,
//! never published): the rule for tests that need an outside tool, a certtool test PKI in
//! QEMU's file layout, and an in-memory block driver.
//!
//! The tool rule: a test that needs a tool (qemu-img, certtool, `/dev/fuse`, ...) runs when
//! the tool is there; when it is not, it is skipped with a message, except under CI
//! (`CI=true`), where a missing tool fails the test loudly.

mod mem;
mod pki;
mod rng;

pub use mem::{MemDriver, BLOCK};
pub use pki::{Pki, KEY_KINDS};
pub use rng::{count_from_env, seed_from_env, Rng};

use std::process::{Command, Output, Stdio};

/// Whether the tests run under CI, where a missing tool is an error rather than a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The tool rule for any prerequisite: `problem` is `None` when it is met. Otherwise this
/// panics under CI and says `skipping: PROBLEM` elsewhere, and returns `false`.
pub fn require(problem: Option<String>) -> bool {
    match problem {
        None => true,
        Some(problem) => {
            assert!(!under_ci(), "{problem} (CI=true: install it, see .ci/run)");
            eprintln!("skipping: {problem}");
            false
        }
    }
}

/// Whether `tool` is on PATH (the tool rule).
pub fn require_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    require((!found).then(|| format!("required tool '{tool}' is not installed")))
}

/// Requires every tool in `tools` (the tool rule).
pub fn require_tools(tools: &[&str]) -> bool {
    tools.iter().all(|t| require_tool(t))
}

/// Whether `tool --version` runs and succeeds (the tool rule): for tools whose presence on
/// PATH is not enough (a wrapper without its package, a too old build).
pub fn require_runs(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    require((!ok).then(|| format!("required tool '{tool}' does not run ('{tool} --version')")))
}

/// Whether Debian's `/usr/bin/python3` can import the libnbd binding (python3-libnbd; the
/// first python3 on PATH may not have it), by the tool rule.
pub fn require_python_nbd() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    require((!ok).then(|| "/usr/bin/python3 cannot import nbd (python3-libnbd)".to_owned()))
}

/// Whether `nbdinfo --size URI` succeeds: whether an NBD client is admitted (libnbd-bin).
pub fn nbdinfo_ok(uri: &str) -> bool {
    Command::new("nbdinfo")
        .args(["--size", uri])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a command that must succeed; returns its output, or panics with it.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must succeed; returns its standard output as text.
pub fn run_stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

/// Runs a command that must fail; returns its standard error.
pub fn run_failing(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded, and was expected to fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_met_prerequisite_is_met_and_a_missing_one_is_not() {
        assert!(require(None));
        assert!(require_tool("sh"));
        if under_ci() {
            let missing = std::panic::catch_unwind(|| require_tool("no-such-tool-here"));
            assert!(missing.is_err(), "under CI a missing tool fails the test");
        } else {
            assert!(!require_tool("no-such-tool-here"));
        }
    }
}
