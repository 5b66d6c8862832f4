//! Errors as QEMU prints them: the message, then each cause after `: `, operating-system
//! errors worded as `strerror` words them ("Could not open 'x': No such file or directory").

use std::error::Error;
use std::io;

/// An OS error as `strerror` words it: Rust's text without its " (os error N)".
pub fn strerror(err: &io::Error) -> String {
    without_os_error(err.to_string())
}

fn without_os_error(text: String) -> String {
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

/// `err` and its causes in one line, `msg: cause: cause`, as QEMU's `error_prepend` chains
/// print; a cause whose text the line already ends with (or an empty one) is left out.
pub fn error_text(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let msg = without_os_error(c.to_string());
        if !msg.is_empty() && !text.ends_with(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("Could not open '{0}'")]
    struct Open(&'static str, #[source] io::Error);

    #[test]
    fn causes_follow_the_message_in_strerror_words() {
        let enoent = || io::Error::from_raw_os_error(libc_enoent());
        assert_eq!(strerror(&enoent()), "No such file or directory");
        assert_eq!(strerror(&io::Error::other("plain")), "plain");
        assert_eq!(
            error_text(&Open("x", enoent())),
            "Could not open 'x': No such file or directory"
        );
        // A message that already says its cause is not repeated.
        #[derive(Debug, thiserror::Error)]
        #[error("read failed: No such file or directory")]
        struct Said(#[source] io::Error);
        assert_eq!(
            error_text(&Said(enoent())),
            "read failed: No such file or directory"
        );
    }

    fn libc_enoent() -> i32 {
        2
    }
}
