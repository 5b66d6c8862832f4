//! Authorization objects: `authz-simple`, `authz-list` and `authz-list-file` (alias `authz-listfile`), as QEMU's
//! `authz/*.c` define them (`qapi/authz.json`), and [`authorize`], the check an NBD server runs
//! on a TLS client's certificate when `tls-authz` names one of them.
//!
//! For TLS clients the identity is the x509 distinguished name of the client's certificate,
//! as [`crate::distinguished_name`] formats it, e.g. `C=GB,O=Example,CN=client`.
//!
//! `glob` rules match as GLib's `g_pattern_match_simple`, which QEMU 10.0 uses: `*` matches
//! any text (also empty, also `/`), `?` exactly one character; every other character,
//! `[` and `\` included, matches itself.
//!
//! `authz-list-file` with `refresh` (the default) reads its file again at each check (a small
//! file, read once per client connection) and reparses it when its contents changed, so an
//! edit, or an editor's rename over it, takes effect for the next client without a restart;
//! QEMU uses inotify to the same effect. A file that fails to load denies
//! everyone until it loads again, as in QEMU; a file that disappears keeps the rules it had.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// An error creating or consulting an authorization object. Use
/// [`AuthzError::qemu_message`] for the full text with its cause.
#[derive(Debug, Error)]
pub enum AuthzError {
    /// The rules file holds an object that is not `AuthZListProperties`.
    #[error(transparent)]
    Rules(#[from] qsd_qapi::ArgumentError),
    /// The rules file cannot be read.
    #[error("Unable to read '{}'", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The rules file is not JSON.
    #[error("JSON parse error in '{}'", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The rules file holds JSON that is not an object.
    #[error("File '{}' must contain a JSON object", path.display())]
    NotObject {
        /// The file.
        path: PathBuf,
    },
    /// A relative `filename` without a directory, with `refresh` on.
    #[error("Filename must be an absolute path")]
    RelativePath,
    /// A `filename` ending in `.`, with `refresh` on.
    #[error("Path has no trailing filename component")]
    NoFilename,
}

impl AuthzError {
    /// The message as QEMU prints it, cause included (see [`crate::TlsError::qemu_message`]).
    pub fn qemu_message(&self) -> String {
        qsd_qapi::error_text(self)
    }
}

/// An authorization object: decides whether an identity may connect.
pub trait Authz: Send + Sync + fmt::Debug {
    /// Whether `identity` is allowed.
    fn is_allowed(&self, identity: &str) -> Result<bool, AuthzError>;
    /// The object's id.
    fn id(&self) -> &str;
    /// The QOM type name (`authz-simple`, ...).
    fn qom_type(&self) -> &'static str;
}

/// The properties of an `authz-simple` object (`AuthZSimpleProperties` in QAPI).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuthzSimpleOptions {
    /// The one identity allowed.
    pub identity: String,
}

/// `authz-simple`: allows exactly one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzSimple {
    id: String,
    identity: String,
}

impl AuthzSimple {
    /// Allows `identity` only.
    pub fn new(id: impl Into<String>, identity: impl Into<String>) -> Self {
        AuthzSimple {
            id: id.into(),
            identity: identity.into(),
        }
    }

    /// From its properties.
    pub fn from_options(id: impl Into<String>, options: AuthzSimpleOptions) -> Self {
        AuthzSimple::new(id, options.identity)
    }

    /// The allowed identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }
}

impl Authz for AuthzSimple {
    fn is_allowed(&self, identity: &str) -> Result<bool, AuthzError> {
        Ok(identity == self.identity)
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn qom_type(&self) -> &'static str {
        "authz-simple"
    }
}

/// `QAuthZListPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Deny access (the default policy of a list).
    #[default]
    Deny,
    /// Allow access.
    Allow,
}

/// `QAuthZListFormat`: how a rule's `match` is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The identity must equal `match` (the default).
    #[default]
    Exact,
    /// `match` is a glob with `*` and `?` (see the module doc).
    Glob,
}

/// `QAuthZListRule`: one rule of a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Rule {
    /// The identity or glob to match (QAPI's `match`).
    #[serde(rename = "match")]
    pub matches: String,
    /// The result when the rule matches.
    pub policy: Policy,
    /// How `matches` is compared.
    #[serde(default)]
    pub format: Format,
}

impl Rule {
    /// Whether the rule matches `identity`.
    pub fn is_match(&self, identity: &str) -> bool {
        match self.format {
            Format::Exact => self.matches == identity,
            Format::Glob => glob_match(&self.matches, identity),
        }
    }
}

/// The rules of a list: the properties of an `authz-list` object (`AuthZListProperties` in
/// QAPI), and the contents of an `authz-list-file`'s file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
pub struct RuleSet {
    /// The result when no rule matches.
    #[serde(default)]
    pub policy: Policy,
    /// The rules, first match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// The properties of an `authz-list` object.
pub type AuthzListOptions = RuleSet;

impl RuleSet {
    /// The first matching rule's policy, else the default policy.
    pub fn is_allowed(&self, identity: &str) -> bool {
        let policy = self
            .rules
            .iter()
            .find(|r| r.is_match(identity))
            .map_or(self.policy, |r| r.policy);
        policy == Policy::Allow
    }
}

/// `authz-list`: an ordered list of rules and a default policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzList {
    id: String,
    rules: RuleSet,
}

impl AuthzList {
    /// A list with these rules.
    pub fn new(id: impl Into<String>, rules: RuleSet) -> Self {
        AuthzList {
            id: id.into(),
            rules,
        }
    }

    /// The rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }
}

impl Authz for AuthzList {
    fn is_allowed(&self, identity: &str) -> Result<bool, AuthzError> {
        Ok(self.rules.is_allowed(identity))
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn qom_type(&self) -> &'static str {
        "authz-list"
    }
}

#[derive(Debug)]
struct FileState {
    /// The file's contents when last read; `None` while it is missing.
    contents: Option<Vec<u8>>,
    /// `None` after a failed reload: everyone is denied until the file loads again.
    rules: Option<RuleSet>,
}

/// The properties of an `authz-list-file` object (`AuthZListFileProperties` in QAPI).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuthzListFileOptions {
    /// The JSON file with the rules.
    pub filename: PathBuf,
    /// Whether edits of the file take effect for the next client (default true).
    #[serde(default = "crate::x509::yes")]
    pub refresh: bool,
}

/// `authz-list-file`: an `authz-list` whose `policy` and `rules` come from a JSON file
/// (`{"policy": "deny", "rules": [{"match": "...", "policy": "allow", "format": "glob"}]}`).
#[derive(Debug)]
pub struct AuthzListFile {
    id: String,
    filename: PathBuf,
    refresh: bool,
    state: Mutex<FileState>,
}

impl AuthzListFile {
    /// Loads `filename`; with `refresh`, later edits of the file take effect at the next check.
    pub fn new(
        id: impl Into<String>,
        filename: impl Into<PathBuf>,
        refresh: bool,
    ) -> Result<Self, AuthzError> {
        let filename = filename.into();
        let contents = read_rules_file(&filename)?;
        let rules = parse_rules(&filename, &contents)?;
        if refresh {
            // After the first load, as QEMU does.
            check_watch_path(&filename)?;
        }
        Ok(AuthzListFile {
            id: id.into(),
            filename,
            refresh,
            state: Mutex::new(FileState {
                contents: Some(contents),
                rules: Some(rules),
            }),
        })
    }

    /// From its properties.
    pub fn from_options(
        id: impl Into<String>,
        options: AuthzListFileOptions,
    ) -> Result<Self, AuthzError> {
        AuthzListFile::new(id, options.filename, options.refresh)
    }

    /// The rules file.
    pub fn filename(&self) -> &Path {
        &self.filename
    }

    /// Reloads the rules if the file's contents changed since they were last read.
    fn refresh(&self, state: &mut FileState) {
        let Ok(contents) = std::fs::read(&self.filename) else {
            // Gone (or unreadable): keep the rules until the file can be read again, as
            // QEMU, which reloads on modification or creation only.
            state.contents = None;
            return;
        };
        if state.contents.as_deref() == Some(contents.as_slice()) {
            return;
        }
        let parsed = parse_rules(&self.filename, &contents);
        state.contents = Some(contents);
        match parsed {
            Ok(rules) => {
                tracing::debug!(id = %self.id, file = %self.filename.display(), "authz rules reloaded");
                state.rules = Some(rules);
            }
            Err(e) => {
                tracing::error!(
                    id = %self.id,
                    "{}; denying every client until the file loads again",
                    e.qemu_message()
                );
                state.rules = None;
            }
        }
    }
}

impl Authz for AuthzListFile {
    fn is_allowed(&self, identity: &str) -> Result<bool, AuthzError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.refresh {
            self.refresh(&mut state);
        }
        Ok(state
            .rules
            .as_ref()
            .is_some_and(|rules| rules.is_allowed(identity)))
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn qom_type(&self) -> &'static str {
        "authz-list-file"
    }
}

/// QEMU's checks on the name of a watched file: a directory must be given, and a file name.
fn check_watch_path(filename: &Path) -> Result<(), AuthzError> {
    let dir = match filename.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir == Path::new(".") {
        return Err(AuthzError::RelativePath);
    }
    if filename.to_string_lossy().ends_with("/.") {
        return Err(AuthzError::NoFilename);
    }
    Ok(())
}

fn read_rules_file(path: &Path) -> Result<Vec<u8>, AuthzError> {
    std::fs::read(path).map_err(|source| AuthzError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses a rules file as QEMU's `qauthz_list_file_load` does.
fn parse_rules(path: &Path, text: &[u8]) -> Result<RuleSet, AuthzError> {
    let value: Value = serde_json::from_slice(text).map_err(|source| AuthzError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let Value::Object(map) = value else {
        return Err(AuthzError::NotObject {
            path: path.to_path_buf(),
        });
    };
    Ok(qsd_qapi::from_value(Value::Object(map))?)
}

/// GLib's `g_pattern_match_simple`: `*` matches any run of characters (also none), `?` any
/// one character, anything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Where the last `*` was, and the text position it is currently made to cover up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and try again.
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Checks a TLS client after its handshake, as QEMU's TLS session does when the server's
/// credentials verify peers and `tls-authz` is set: for x509, takes the client's certificate
/// (the first of its chain), formats its distinguished name and asks `authz`; for PSK, asks
/// `authz` about the client's username.
///
/// Call it for x509 only when `tls-authz` is set and the credentials have `verify-peer=on`
/// ([`crate::TlsCredsX509::verify_peer`]): QEMU ignores `tls-authz` otherwise, and
/// admits the client.
///
/// `authz` is `None` when `tls-authz` names no existing object: access is denied ("If
/// missing, it will default to denying access"). Returns the name when allowed, and otherwise
/// the reason in QEMU's words (e.g. `TLS x509 authz check for C=GB,CN=x is denied`), for
/// the server to log.
///
/// Each authorization object of this crate is an [`nbd_server::Authorize`] that calls this.
#[cfg(feature = "nbd")]
pub fn authorize(
    authz: Option<&dyn Authz>,
    peer: nbd_server::Peer<'_>,
) -> Result<String, nbd_server::Refusal> {
    use nbd_server::{Peer, Refusal};
    let name = match peer {
        Peer::Certificate(cert) => {
            let cert = cert.ok_or(Refusal::NoCertificate)?;
            crate::distinguished_name(cert).map_err(|e| Refusal::Identity(Box::new(e)))?
        }
        Peer::PskIdentity(username) => username.to_string(),
    };
    let allowed = match authz {
        Some(a) => a
            .is_allowed(&name)
            .map_err(|e| Refusal::Failed(Box::new(e)))?,
        None => false,
    };
    if allowed {
        Ok(name)
    } else {
        Err(Refusal::Denied {
            kind: peer.kind(),
            identity: name,
        })
    }
}

/// An NBD server's `tls-authz` with one of these objects: [`authorize`].
#[cfg(feature = "nbd")]
macro_rules! nbd_authorize {
    ($($t:ty),*) => {$(
        impl nbd_server::Authorize for $t {
            fn authorize(
                &self,
                peer: nbd_server::Peer<'_>,
            ) -> Result<String, nbd_server::Refusal> {
                authorize(Some(self), peer)
            }
        }
    )*};
}

#[cfg(feature = "nbd")]
nbd_authorize!(AuthzSimple, AuthzList, AuthzListFile);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::tests::TempDir;
    #[cfg(feature = "nbd")]
    use nbd_server::{Peer, Refusal};

    #[test]
    fn glob_is_glib_pattern_match_simple() {
        let cases: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("*", "anything, at/all", true),
            ("?", "", false),
            ("?", "a", true),
            ("?", "\u{e9}", true), // one character, two bytes
            ("??", "\u{e9}", false),
            ("a*b", "ab", true),
            ("a*b", "axxb", true),
            ("a*b", "axxbc", false),
            ("a*b*c", "abbbcbc", true),
            ("*a", "bbba", true),
            ("*a", "bbab", false),
            ("C=GB,*,CN=*", "C=GB,O=Example,CN=client", true),
            ("C=GB,*,CN=*", "C=FR,O=Example,CN=client", false),
            // No bracket classes and no escapes: QEMU 10.0 refused `[C]=GB*` for `C=GB,...`.
            ("[C]=GB*", "C=GB,O=x", false),
            ("[C]=GB*", "[C]=GB,O=x", true),
            ("a\\*", "a\\bc", true),
            ("a\\*", "a*", false),
            ("**a**", "a", true),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob_match(p, t), *want, "pattern {p:?} text {t:?}");
        }
    }

    fn list(json: &str) -> AuthzList {
        AuthzList::new("a", serde_json::from_str(json).unwrap())
    }

    #[test]
    fn list_first_matching_rule_wins_then_default_policy() {
        let l = list(
            r#"{"rules": [
                {"match": "CN=bad", "policy": "deny"},
                {"match": "CN=*", "policy": "allow", "format": "glob"},
                {"match": "CN=good", "policy": "deny"}
            ]}"#,
        );
        assert!(!l.is_allowed("CN=bad").unwrap());
        assert!(l.is_allowed("CN=good").unwrap());
        assert!(l.is_allowed("CN=other").unwrap());
        // No rule matches: the default policy, deny.
        assert!(!l.is_allowed("O=x").unwrap());
        // An exact rule does not glob.
        let l = list(r#"{"policy": "allow", "rules": [{"match": "CN=*", "policy": "deny"}]}"#);
        assert!(!l.is_allowed("CN=*").unwrap());
        assert!(l.is_allowed("CN=x").unwrap());
        assert_eq!(l.id(), "a");
        assert_eq!(l.qom_type(), "authz-list");
    }

    #[test]
    fn simple_allows_its_identity_only() {
        let s = AuthzSimple::from_options(
            "s",
            serde_json::from_str(r#"{"identity": "C=GB,O=Example,CN=client"}"#).unwrap(),
        );
        assert!(s.is_allowed("C=GB,O=Example,CN=client").unwrap());
        assert!(!s.is_allowed("C=GB,O=Example,CN=client2").unwrap());
        assert!(!s.is_allowed("CN=client,O=Example,C=GB").unwrap());
    }

    #[test]
    fn listfile_errors_at_creation() {
        let tmp = TempDir::new();
        let f = tmp.path().join("acl.json");
        let fs = f.display().to_string();
        let err = || {
            AuthzListFile::new("a", &f, true)
                .unwrap_err()
                .qemu_message()
        };
        assert_eq!(
            err(),
            format!("Unable to read '{fs}': No such file or directory")
        );
        std::fs::write(&f, "{\"policy\": ").unwrap();
        assert!(err().starts_with(&format!("JSON parse error in '{fs}': ")));
        std::fs::write(&f, "[]").unwrap();
        assert_eq!(err(), format!("File '{fs}' must contain a JSON object"));
        std::fs::write(&f, r#"{"policy": "allow", "bogus": 1}"#).unwrap();
        assert_eq!(err(), "Parameter 'bogus' is unexpected");
        // QEMU's checks of a watched name.
        assert!(matches!(
            check_watch_path(Path::new("acl.json")),
            Err(AuthzError::RelativePath)
        ));
        assert!(matches!(
            check_watch_path(Path::new("./acl.json")),
            Err(AuthzError::RelativePath)
        ));
        assert!(matches!(
            check_watch_path(Path::new("/etc/.")),
            Err(AuthzError::NoFilename)
        ));
        assert!(check_watch_path(Path::new("dir/acl.json")).is_ok());
        assert!(check_watch_path(&f).is_ok());
    }

    #[test]
    fn listfile_reloads_after_an_edit_and_denies_while_broken() {
        let tmp = TempDir::new();
        let f = tmp.path().join("acl.json");
        std::fs::write(
            &f,
            r#"{"policy": "deny", "rules": [{"match": "CN=alice", "policy": "allow"}]}"#,
        )
        .unwrap();
        let a = AuthzListFile::new("a", &f, true).unwrap();
        let frozen = AuthzListFile::new("b", &f, false).unwrap();
        assert!(a.is_allowed("CN=alice").unwrap());
        assert!(!a.is_allowed("CN=bob").unwrap());

        // An edit in place, of the same size.
        std::fs::write(
            &f,
            r#"{"policy": "deny", "rules": [{"match": "CN=bob??", "policy": "allow"}]}"#,
        )
        .unwrap();
        assert!(!a.is_allowed("CN=alice").unwrap());
        assert!(a.is_allowed("CN=bob").unwrap() == glob_match("CN=bob??", "CN=bob"));
        assert!(a.is_allowed("CN=bob??").unwrap());

        // An editor's write-and-rename.
        let tmpf = tmp.path().join("acl.json.new");
        std::fs::write(&tmpf, r#"{"policy": "allow", "rules": [{"match": "CN=e*", "policy": "deny", "format": "glob"}]}"#).unwrap();
        std::fs::rename(&tmpf, &f).unwrap();
        assert!(!a.is_allowed("CN=eve").unwrap());
        assert!(a.is_allowed("CN=bob??").unwrap());

        // A broken file denies everyone until it is fixed.
        std::fs::write(&f, "{not json").unwrap();
        assert!(!a.is_allowed("CN=bob??").unwrap());
        std::fs::write(&f, r#"{"policy": "allow"}"#).unwrap();
        assert!(a.is_allowed("CN=anyone").unwrap());

        // Without refresh, the rules read at creation stay.
        assert!(frozen.is_allowed("CN=alice").unwrap());
        assert!(!frozen.is_allowed("CN=anyone").unwrap());
    }

    #[test]
    #[cfg(feature = "nbd")]
    fn authorize_checks_the_dn_of_the_peer_certificate() {
        use crate::x509::tests::{have_tool, make_pki, KeyKind, CLIENT_DN};
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        let pki = make_pki(KeyKind::RsaPkcs1);
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let cert = CertificateDer::from_pem_file(pki.client_dir.join("client-cert.pem")).unwrap();

        let ok = AuthzSimple::new("a", CLIENT_DN);
        assert_eq!(
            authorize(Some(&ok), Peer::Certificate(Some(&cert))).map_err(|e| e.message()),
            Ok(CLIENT_DN.to_string())
        );

        let other = AuthzSimple::new("a", "CN=someone else");
        assert_eq!(
            authorize(Some(&other), Peer::Certificate(Some(&cert))).map_err(|e| e.message()),
            Err(format!("TLS x509 authz check for {CLIENT_DN} is denied"))
        );
        // tls-authz names no object: denied.
        assert_eq!(
            authorize(None, Peer::Certificate(Some(&cert))).map_err(|e| e.message()),
            Err(format!("TLS x509 authz check for {CLIENT_DN} is denied"))
        );
        // No certificate at all.
        assert!(matches!(
            nbd_server::Authorize::authorize(&ok, Peer::Certificate(None)),
            Err(Refusal::NoCertificate)
        ));
        // A glob over the DN.
        let l = list(
            r#"{"rules": [{"match": "C=GB,*,O=Example\\, Inc.,*", "policy": "allow", "format": "glob"}]}"#,
        );
        assert!(authorize(Some(&l), Peer::Certificate(Some(&cert))).is_ok());
    }
}
