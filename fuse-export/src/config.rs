//! Options of a FUSE export, as QAPI's `BlockExportOptionsFuse` and the common
//! `BlockExportOptions` fields that concern it.

use std::path::PathBuf;

/// Whether other users than the one running the daemon may access the export
/// (QAPI `FuseExportAllowOther`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AllowOther {
    /// Mount without `allow_other`: only the daemon's user (and root) may access the file.
    Off,
    /// Mount with `allow_other`; fail when the kernel (or `/etc/fuse.conf`) refuses it.
    On,
    /// Try `allow_other`, and mount without it when that fails (QSD's default).
    #[default]
    Auto,
}

impl AllowOther {
    /// The QAPI spelling: `off`, `on` or `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            AllowOther::Off => "off",
            AllowOther::On => "on",
            AllowOther::Auto => "auto",
        }
    }

    /// Parses the QAPI spelling (`off`, `on`, `auto`).
    pub fn from_qapi(value: &str) -> Option<AllowOther> {
        match value {
            "off" => Some(AllowOther::Off),
            "on" => Some(AllowOther::On),
            "auto" => Some(AllowOther::Auto),
            _ => None,
        }
    }
}

/// How to export a node through FUSE: [`FuseExportConfig::new`], then the setters of what
/// differs from QSD's defaults (more options may come: the struct cannot be built by hand).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FuseExportConfig {
    /// The file to mount the export on; it must exist and be a regular file.
    pub mountpoint: PathBuf,
    /// Writes past the end of the node grow it (QAPI `growable`). Without it, a write that
    /// starts at or beyond the end fails with `EIO` and one that crosses it is cut short.
    pub growable: bool,
    /// Whether clients may write (QAPI `writable`): the file's mode is 0600 when set, 0400
    /// when not.
    pub writable: bool,
    /// Every write is made stable before it is acknowledged (QAPI `writethrough`).
    pub writethrough: bool,
    /// Whether other users may access the file (QAPI `allow-other`).
    pub allow_other: AllowOther,
}

impl FuseExportConfig {
    /// A read-only, fixed-size export on `mountpoint` with `allow-other=auto`, as QSD's
    /// defaults.
    pub fn new(mountpoint: impl Into<PathBuf>) -> Self {
        FuseExportConfig {
            mountpoint: mountpoint.into(),
            growable: false,
            writable: false,
            writethrough: false,
            allow_other: AllowOther::Auto,
        }
    }

    /// Sets [`FuseExportConfig::growable`].
    pub fn growable(mut self, growable: bool) -> Self {
        self.growable = growable;
        self
    }

    /// Sets [`FuseExportConfig::writable`].
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Sets [`FuseExportConfig::writethrough`].
    pub fn writethrough(mut self, writethrough: bool) -> Self {
        self.writethrough = writethrough;
        self
    }

    /// Sets [`FuseExportConfig::allow_other`].
    pub fn allow_other(mut self, allow_other: AllowOther) -> Self {
        self.allow_other = allow_other;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qapi_spellings_round_trip() {
        for value in [AllowOther::Off, AllowOther::On, AllowOther::Auto] {
            assert_eq!(AllowOther::from_qapi(value.as_str()), Some(value));
        }
        assert_eq!(AllowOther::from_qapi("yes"), None);
        assert_eq!(AllowOther::default(), AllowOther::Auto);
    }

    #[test]
    fn defaults_are_qsds() {
        let cfg = FuseExportConfig::new("/tmp/x");
        assert!(!cfg.writable && !cfg.growable && !cfg.writethrough);
        assert_eq!(cfg.allow_other, AllowOther::Auto);
    }

    #[test]
    fn the_export_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::FuseExport>();
        send_sync::<crate::FuseError>();
    }
}
