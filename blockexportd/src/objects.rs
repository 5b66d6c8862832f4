//! QOM objects: the object types `object-add`/`--object` create, in one registry
//! ([`TYPES`]: name, parent, properties, create), and the objects by id.
//!
//! An object is stored with the properties it was created with, typed (`poll-max-ns=10` from
//! the command line is the integer 10), so that `qom-get` answers as QEMU does. The objects
//! themselves are `block_core`'s [`IoThread`] and `qsd_crypto`'s TLS credentials,
//! authorization objects and secrets.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use qmp_server::QmpError;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

/// An `iothread` object: a dedicated OS thread running its own event loop, named
/// `iothread-ID`.
pub use block_core::IoThread;

use crate::daemon::CmdResult;

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

/// An object with what it was created with, for `qom-list` and `qom-get`.
pub struct ObjectEntry {
    /// Its type.
    pub ty: &'static dyn ObjectType,
    /// The object (an [`IoThread`], a `qsd_crypto::TlsCredsX509`, ...).
    pub object: Arc<dyn Any + Send + Sync>,
    /// The properties it was created with (without `qom-type` and `id`), typed.
    pub props: Map<String, Value>,
}

impl std::fmt::Debug for ObjectEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectEntry")
            .field("type", &self.ty.name())
            .field("props", &self.props)
            .finish_non_exhaustive()
    }
}

impl ObjectEntry {
    /// The object if it is a `T`.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        Arc::clone(&self.object).downcast::<T>().ok()
    }

    /// `qom-get`: the value it was created with, else the type's default.
    pub fn property(&self, name: &str) -> Option<Value> {
        let (_, _, default) = self
            .ty
            .properties()
            .into_iter()
            .find(|(n, _, _)| *n == name)?;
        Some(self.props.get(name).cloned().unwrap_or(default))
    }
}

/// The objects by id. A plain mutex: the NBD server looks authz objects up from its
/// connection tasks.
pub type Objects = Mutex<BTreeMap<String, ObjectEntry>>;

/// Locks the objects (a poisoned lock is taken over: the map stays consistent).
pub fn lock(objects: &Objects) -> MutexGuard<'_, BTreeMap<String, ObjectEntry>> {
    objects.lock().unwrap_or_else(|e| e.into_inner())
}

/// What creating an object may consult.
pub struct CreateContext<'a> {
    /// The id of the object being created.
    pub id: &'a str,
    /// Checks the id (well-formed, not taken), at the point where QEMU does: after the
    /// properties, before anything is loaded.
    pub check_id: &'a dyn Fn() -> CmdResult<()>,
    /// The existing objects (for a secret's `keyid`).
    pub objects: &'a Objects,
}

impl qsd_crypto::Secrets for CreateContext<'_> {
    fn secret(&self, id: &str) -> Result<Vec<u8>, qsd_crypto::SecretError> {
        if id == self.id {
            // QEMU finds the secret being created, which has no data yet.
            return Err(qsd_crypto::SecretError::Empty(id.to_string()));
        }
        secret(self.objects, id)
    }
}

/// The daemon's objects as block-core's drivers look them up when they open (a secret for
/// RBD's `key-secret`, client TLS credentials for the NBD client's `tls-creds`).
#[derive(Debug)]
pub struct DriverObjects(pub Arc<Objects>);

impl block_core::objects::ObjectLookup for DriverObjects {
    fn secret(&self, id: &str) -> Result<Vec<u8>, block_core::objects::ObjectError> {
        Ok(secret(&self.0, id)?)
    }

    fn tls_client(
        &self,
        id: &str,
        check_hostname: bool,
    ) -> Result<Arc<rustls::ClientConfig>, block_core::objects::ObjectError> {
        let objects = lock(&self.0);
        let creds = objects
            .get(id)
            .ok_or_else(|| format!("No TLS credentials with id '{id}'"))?
            .get::<qsd_crypto::TlsCredsX509>()
            .ok_or_else(|| format!("Object with id '{id}' is not TLS credentials"))?;
        let config = if check_hostname {
            creds.client_config()
        } else {
            creds.client_config_without_hostname()
        };
        Ok(config.map_err(|e| e.qemu_message())?)
    }
}

/// The bytes of secret object `id`, with QEMU's errors.
pub fn secret(objects: &Objects, id: &str) -> Result<Vec<u8>, qsd_crypto::SecretError> {
    let objects = lock(objects);
    let entry = objects
        .get(id)
        .ok_or_else(|| qsd_crypto::SecretError::NotFound(id.to_string()))?;
    let secret = entry
        .get::<qsd_crypto::Secret>()
        .ok_or_else(|| qsd_crypto::SecretError::NotASecret(id.to_string()))?;
    Ok(secret.value().to_vec())
}

/// A QOM type `object-add` creates.
pub trait ObjectType: Sync {
    /// The QOM type name.
    fn name(&self) -> &'static str;
    /// The parent type, for `qom-list-types`.
    fn parent(&self) -> &'static str;
    /// Name, QOM type and the value `qom-get` answers when the object was created without
    /// it (QEMU's defaults), in QEMU's `qom-list` order.
    fn properties(&self) -> Vec<(&'static str, &'static str, Value)>;
    /// Creates object `id` from its properties (`keyval`: strings from the command line).
    fn create(
        &'static self,
        id: &str,
        props: Map<String, Value>,
        keyval: bool,
        cx: &CreateContext<'_>,
    ) -> CmdResult<ObjectEntry>;
}

/// A type whose properties are the serde struct `O`, built by `build`.
struct Type<O> {
    name: &'static str,
    parent: &'static str,
    properties: fn() -> Vec<(&'static str, &'static str, Value)>,
    /// The QAPI struct has an `id` member (only `iothread`'s here).
    with_id: bool,
    build: fn(&str, O, &CreateContext<'_>) -> CmdResult<Arc<dyn Any + Send + Sync>>,
}

impl<O: DeserializeOwned> ObjectType for Type<O> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn parent(&self) -> &'static str {
        self.parent
    }

    fn properties(&self) -> Vec<(&'static str, &'static str, Value)> {
        (self.properties)()
    }

    fn create(
        &'static self,
        id: &str,
        mut props: Map<String, Value>,
        keyval: bool,
        cx: &CreateContext<'_>,
    ) -> CmdResult<ObjectEntry> {
        if self.with_id {
            props.insert("id".into(), Value::from(id));
        }
        let options = object_props::<O>(props.clone(), keyval)?;
        props.remove("id");
        let props = typed_props(props, &self.properties());
        (cx.check_id)()?;
        Ok(ObjectEntry {
            ty: self,
            object: (self.build)(id, options, cx)?,
            props,
        })
    }
}

fn crypto_error(e: impl std::error::Error) -> QmpError {
    generic(qsd_qapi::error_text(&e))
}

static IOTHREAD: Type<crate::qapi::IothreadProps> = Type {
    name: "iothread",
    parent: "object",
    properties: || {
        vec![
            ("thread-pool-min", "int", json!(0)),
            ("aio-max-batch", "int", json!(0)),
            ("thread-pool-max", "int", json!(64)),
            ("poll-max-ns", "int", json!(32768)),
            ("poll-grow", "int", json!(0)),
            ("poll-shrink", "int", json!(0)),
        ]
    },
    with_id: true,
    build: |id, _, _| {
        let thread = IoThread::spawn(format!("iothread-{id}"))
            .map_err(|e| generic(format!("Failed to create iothread: {e}")))?;
        Ok(Arc::new(thread))
    },
};

static TLS_CREDS_X509: Type<qsd_crypto::TlsCredsX509Options> = Type {
    name: "tls-creds-x509",
    parent: "tls-creds",
    properties: || {
        vec![
            ("loaded", "bool", json!(true)),
            ("sanity-check", "bool", json!(true)),
            ("passwordid", "string", Value::Null),
            ("dir", "string", Value::Null),
            ("endpoint", "QCryptoTLSCredsEndpoint", json!("server")),
            ("priority", "string", Value::Null),
            ("verify-peer", "bool", json!(true)),
        ]
    },
    with_id: false,
    build: |id, o, _| {
        Ok(Arc::new(
            qsd_crypto::TlsCredsX509::new(id, o).map_err(|e| generic(e.qemu_message()))?,
        ))
    },
};

#[cfg(feature = "psk")]
static TLS_CREDS_PSK: Type<qsd_crypto::TlsCredsPskOptions> = Type {
    name: "tls-creds-psk",
    parent: "tls-creds",
    // qemu-storage-daemon 10.0's order; unset strings read as "".
    properties: || {
        vec![
            ("endpoint", "QCryptoTLSCredsEndpoint", json!("server")),
            ("dir", "string", Value::Null),
            ("verify-peer", "bool", json!(true)),
            ("priority", "string", json!("")),
            ("username", "string", json!("")),
        ]
    },
    with_id: false,
    build: |id, o, _| {
        Ok(Arc::new(
            qsd_crypto::TlsCredsPsk::new(id, o).map_err(|e| generic(e.qemu_message()))?,
        ))
    },
};

/// An authorization object, as the NBD server looks it up by id.
pub type Authz = dyn qsd_crypto::Authz;

static AUTHZ_SIMPLE: Type<qsd_crypto::AuthzSimpleOptions> = Type {
    name: "authz-simple",
    parent: "authz",
    properties: || vec![("identity", "string", Value::Null)],
    with_id: false,
    build: |id, o, _| {
        let authz: Arc<Authz> = Arc::new(qsd_crypto::AuthzSimple::from_options(id, o));
        Ok(Arc::new(authz))
    },
};

static AUTHZ_LIST: Type<qsd_crypto::AuthzListOptions> = Type {
    name: "authz-list",
    parent: "authz",
    properties: || {
        vec![
            ("policy", "QAuthZListPolicy", json!("deny")),
            ("rules", "QAuthZListRule", json!([])),
        ]
    },
    with_id: false,
    build: |id, o, _| {
        let authz: Arc<Authz> = Arc::new(qsd_crypto::AuthzList::new(id, o));
        Ok(Arc::new(authz))
    },
};

static AUTHZ_LIST_FILE: Type<qsd_crypto::AuthzListFileOptions> = Type {
    name: "authz-list-file",
    parent: "authz",
    properties: || {
        vec![
            ("filename", "string", Value::Null),
            ("refresh", "bool", json!(true)),
        ]
    },
    with_id: false,
    build: |id, o, _| {
        let authz: Arc<Authz> =
            Arc::new(qsd_crypto::AuthzListFile::from_options(id, o).map_err(crypto_error)?);
        Ok(Arc::new(authz))
    },
};

static SECRET: Type<qsd_crypto::SecretOptions> = Type {
    name: "secret",
    parent: "secret_common",
    // qemu-storage-daemon 10.0's `qom-list` order; unset strings read as "".
    properties: || {
        vec![
            ("iv", "string", json!("")),
            ("keyid", "string", json!("")),
            ("format", "QCryptoSecretFormat", json!("raw")),
            ("file", "string", json!("")),
            ("data", "string", json!("")),
        ]
    },
    with_id: false,
    build: |_, o, cx| {
        Ok(Arc::new(
            qsd_crypto::Secret::new(o, cx).map_err(crypto_error)?,
        ))
    },
};

/// Every QOM type `object-add` creates here.
pub static TYPES: &[&dyn ObjectType] = &[
    &IOTHREAD,
    &TLS_CREDS_X509,
    #[cfg(feature = "psk")]
    &TLS_CREDS_PSK,
    &AUTHZ_SIMPLE,
    &AUTHZ_LIST,
    &AUTHZ_LIST_FILE,
    &SECRET,
];

/// `authz-pam`'s properties (`AuthZPAMProperties`): checked, then the type is refused as
/// QSD 10.0, built without PAM, refuses it.
#[derive(Debug, serde::Deserialize)]
pub struct AuthzPamOptions {
    /// The PAM service.
    pub service: String,
}

static AUTHZ_PAM: Type<AuthzPamOptions> = Type {
    name: "authz-pam",
    parent: "authz",
    properties: || vec![("service", "string", Value::Null)],
    with_id: false,
    build: |_, _, _| Err(generic("invalid object type: authz-pam")),
};

/// The type named `name`: refused with QEMU's text if there is none, or with why for the
/// TLS credentials types this build cannot provide.
///
/// `authz-listfile`, QAPI's name of `authz-list-file`, is the same type. (QSD 10.0 cannot
/// create either: its QAPI schema knows only `authz-listfile`, its QOM only
/// `authz-list-file`.) `authz-pam` is QAPI's too: its properties are checked before QSD's
/// refusal. Neither is listed by `qom-list-types`.
pub fn find_type(name: &str) -> CmdResult<&'static dyn ObjectType> {
    let name = match name {
        "authz-listfile" => "authz-list-file",
        "authz-pam" => return Ok(&AUTHZ_PAM),
        name => name,
    };
    if let Some(ty) = TYPES.iter().find(|t| t.name() == name) {
        return Ok(*ty);
    }
    if name.starts_with("tls-creds") {
        qsd_crypto::check_creds_type(name).map_err(|e| generic(e.qemu_message()))?;
    }
    Err(generic(format!(
        "Parameter 'qom-type' does not accept value '{name}'"
    )))
}

// ----- reading properties -----

/// Reads an object's properties into `T` with QAPI's checks and messages: JSON-typed from
/// QMP, or from the command line's keyval strings (`keyval`), where a string becomes the
/// boolean or number `T` asks for (qsd-qapi's keyval mode, as QEMU's keyval input visitor).
/// The one place object properties are read.
pub fn object_props<T: DeserializeOwned>(
    props: Map<String, Value>,
    keyval: bool,
) -> Result<T, QmpError> {
    Ok(qsd_qapi::from_value_in(
        Value::Object(props),
        "",
        qsd_qapi::Syntax::keyval_if(keyval),
    )?)
}

/// The properties as `qom-get` answers them: a command-line string of a `bool`, `int` or
/// `number` property (the types a type declares in [`ObjectType::properties`]) becomes that
/// scalar, as QOM stores it (`poll-max-ns=10` is `10`). Called once [`object_props`] has
/// accepted them, so every such string parses.
fn typed_props(
    mut props: Map<String, Value>,
    declared: &[(&'static str, &'static str, Value)],
) -> Map<String, Value> {
    use qsd_qapi::keyval::{parse_bool, parse_int64, parse_number, parse_uint64};
    for (name, ty, _) in declared {
        let Some(Value::String(text)) = props.get(*name) else {
            continue;
        };
        let typed = match *ty {
            "bool" => parse_bool(text).map(Value::Bool),
            "int" => parse_int64(text)
                .map(Value::from)
                .or_else(|| parse_uint64(text).map(Value::from)),
            "number" => parse_number(text).map(Value::from),
            _ => None,
        };
        if let Some(typed) = typed {
            props.insert((*name).to_string(), typed);
        }
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    }

    fn err<T: DeserializeOwned>(props: Map<String, Value>, keyval: bool) -> String {
        object_props::<T>(props, keyval).err().unwrap().desc
    }

    #[test]
    fn keyval_strings_become_typed_values() {
        let given = strings(&[("id", "io0"), ("poll-max-ns", "0x10")]);
        let o = object_props::<crate::qapi::IothreadProps>(given.clone(), true).unwrap();
        assert_eq!(o.poll_max_ns, Some(16));
        let props = typed_props(given, &IOTHREAD.properties());
        assert_eq!(props["poll-max-ns"], json!(16));
        assert_eq!(
            err::<crate::qapi::IothreadProps>(strings(&[("id", "i"), ("poll-max-ns", "x")]), true),
            "Parameter 'poll-max-ns' expects integer"
        );
        // An unknown member does not stop the coercion of the others: QSD's first error.
        assert_eq!(
            err::<crate::qapi::IothreadProps>(
                strings(&[("id", "i"), ("poll-max-ns", "1"), ("bogus", "2")]),
                true
            ),
            "Parameter 'bogus' is unexpected"
        );
        let given = strings(&[
            ("dir", "/d"),
            ("verify-peer", "off"),
            ("endpoint", "client"),
        ]);
        let o = object_props::<qsd_crypto::TlsCredsX509Options>(given.clone(), true).unwrap();
        assert!(!o.verify_peer && o.endpoint == qsd_crypto::Endpoint::Client);
        let props = typed_props(given, &TLS_CREDS_X509.properties());
        assert_eq!(props["verify-peer"], json!(false));
    }

    #[test]
    fn property_errors_use_qemu_wording() {
        use qsd_crypto::{AuthzListOptions, AuthzSimpleOptions, TlsCredsX509Options as X509};
        assert_eq!(
            err::<X509>(strings(&[("dir", "/x"), ("endpoint", "foo")]), true),
            "Parameter 'endpoint' does not accept value 'foo'"
        );
        assert_eq!(
            err::<X509>(strings(&[("dir", "/x"), ("foo", "bar")]), true),
            "Parameter 'foo' is unexpected"
        );
        assert_eq!(
            err::<X509>(strings(&[("dir", "/x"), ("verify-peer", "maybe")]), true),
            "Parameter 'verify-peer' expects 'on' or 'off'"
        );
        let mut typed = Map::new();
        typed.insert("dir".into(), Value::Bool(true));
        assert_eq!(
            err::<X509>(typed.clone(), true),
            "Invalid parameter type for 'dir', expected: string"
        );
        // QMP wants JSON booleans; `loaded` is read-only, so unexpected.
        assert_eq!(
            err::<X509>(strings(&[("sanity-check", "on")]), false),
            "Invalid parameter type for 'sanity-check', expected: boolean"
        );
        typed.insert("loaded".into(), Value::Bool(true));
        typed.remove("dir");
        assert_eq!(
            err::<X509>(typed, false),
            "Parameter 'loaded' is unexpected"
        );
        assert_eq!(
            err::<AuthzSimpleOptions>(Map::new(), true),
            "Parameter 'identity' is missing"
        );
        assert_eq!(
            err::<AuthzListOptions>(strings(&[("policy", "foo")]), true),
            "Parameter 'policy' does not accept value 'foo'"
        );
        let mut m = Map::new();
        m.insert(
            "rules".into(),
            json!([{"match": "x", "policy": "allow", "format": "regex"}]),
        );
        assert_eq!(
            err::<AuthzListOptions>(m, true),
            "Parameter 'format' does not accept value 'regex'"
        );
        let mut m = Map::new();
        m.insert("rules".into(), json!([{"match": "x"}]));
        assert_eq!(
            err::<AuthzListOptions>(m.clone(), false),
            "Parameter 'rules[0].policy' is missing"
        );
        assert_eq!(
            err::<AuthzListOptions>(m, true),
            "Parameter 'rules.0.policy' is missing"
        );
    }

    #[test]
    fn types_are_registered_once() {
        let mut names: Vec<_> = TYPES.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TYPES.len());
        assert!(!names.contains(&"authz-pam") && !names.contains(&"authz-listfile"));
        assert_eq!(
            find_type("authz-listfile").ok().map(|t| t.name()),
            Some("authz-list-file")
        );
        assert_eq!(
            find_type("nonsense").err().unwrap().desc,
            "Parameter 'qom-type' does not accept value 'nonsense'"
        );
        assert!(find_type("tls-creds-anon")
            .err()
            .unwrap()
            .desc
            .contains("anonymous"));
    }
}
