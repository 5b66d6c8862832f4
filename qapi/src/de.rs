//! QAPI input: values checked the way QAPI checks them, with QAPI's wording.
//!
//! [`from_value`] deserialises a value (a QMP command's `arguments`) into any
//! `serde::de::DeserializeOwned` type through a deserializer that knows where
//! it is in the input, so errors name the member as QEMU does:
//!
//! | problem | message (class `GenericError`) |
//! |---|---|
//! | member missing | `Parameter 'addr.data.path' is missing` |
//! | member not in the struct | `Parameter 'bitmaps[1].q' is unexpected` |
//! | wrong JSON type | `Invalid parameter type for 'id', expected: string` (`integer`, `boolean`, `number`, `array`, `object`, `null`) |
//! | enum value unknown | `Parameter 'mode' does not accept value 'foo'` |
//! | `u64` not an integer | `Parameter 'max-connections' expects uint64` |
//! | integer out of range | `Parameter 'max-connections' expects uint32_t` |
//!
//! As in QEMU, the last two rows and the enum row name the member by its own
//! name, not its path, and a list element by `null`
//! (`Parameter 'null' does not accept value 'foo'`); a negative number given
//! for a `u64` is taken modulo 2^64 (QEMU keeps that for compatibility).
//!
//! QAPI semantics that differ from serde's defaults:
//! - members not declared by a struct are refused even without
//!   `#[serde(deny_unknown_fields)]` (the check uses the struct's field list);
//! - an `Option` member that is present must hold a valid value: `null` is
//!   refused like any other wrong type (absent means `None`);
//! - members are visited in the struct's declaration order (QAPI's schema
//!   order), so with several bad members the one QEMU reports is reported.
//!
//! serde's enum representations:
//! - unit-variant enums are QAPI enums (`does not accept value`);
//! - adjacently tagged enums (`#[serde(tag = "type", content = "data")]`,
//!   QAPI's legacy unions such as `SocketAddressLegacy`) keep full paths;
//! - untagged enums are QAPI alternates: when no variant matches, the error
//!   is `Invalid parameter type for 'NAME', expected: ENUM` with the Rust
//!   enum's name (name it after the QAPI type, e.g. `BlockDirtyBitmapOrStr`,
//!   to get QEMU's exact text); errors inside a variant are not reported;
//! - `#[serde(flatten)]` and internally tagged enums (`#[serde(tag = "type")]`)
//!   make serde buffer the input: missing and unknown members are still
//!   named by path, but a wrong type inside them names only the enclosing
//!   member, and unknown members inside a flattened struct are not detected
//!   (the tag itself is checked with QEMU's text). Prefer [`parse_base`]
//!   then [`from_value`] for QAPI flat unions.

use std::cell::Cell;
use std::fmt::{self, Display};
use std::rc::Rc;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, Expected, IntoDeserializer, MapAccess,
    SeqAccess, Unexpected, VariantAccess, Visitor,
};
use serde_json::{Map, Value};

use crate::qdict::keys as qdict_keys;

/// Why a command's arguments were refused. Each text is QAPI's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgumentError {
    /// A required member is absent (dotted path).
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    /// A member the command does not take (dotted path).
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// A member of the wrong JSON type (dotted path, QAPI type name).
    #[error("Invalid parameter type for '{path}', expected: {expected}")]
    InvalidType {
        /// Dotted path of the member (`a.b[1].c`).
        path: String,
        /// QAPI's name for the expected type.
        expected: String,
    },
    /// A string that is not one of an enum's values.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    InvalidEnumValue {
        /// The member's own name (`null` for a list element).
        name: String,
        /// The value given.
        value: String,
    },
    /// A value of the right JSON type that is not acceptable (range).
    #[error("Parameter '{name}' expects {expected}")]
    InvalidValue {
        /// The member's name, as QEMU reports it for this check.
        name: String,
        /// What was expected (`uint32_t`, `uint64`, ...).
        expected: String,
    },
    /// In keyval syntax, an object or list where a scalar is wanted (dotted path).
    #[error("Parameters '{0}.*' are unexpected")]
    UnexpectedNested(String),
    /// Any other message raised by a `Deserialize` implementation.
    #[error("{0}")]
    Custom(String),
}

/// Where a value comes from, which decides how its scalars are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Syntax {
    /// JSON (QMP, or an option argument starting with `{`): scalars must have the
    /// JSON type the member asks for (`Invalid parameter type for 'x', expected:
    /// boolean`).
    #[default]
    Json,
    /// QEMU's keyval syntax ([`crate::keyval::parse`]): every scalar is a string and
    /// becomes what the member asks for, as QEMU's keyval input visitor converts it
    /// (`on`/`yes`/`true`/`y` for a boolean, C `strtoll()` base 0 for an integer,
    /// `64k` for a [`Size`]), with that visitor's messages (`Parameter 'x' expects
    /// 'on' or 'off'`, `Parameter 'x' expects integer`, `Parameter 'x' expects size`).
    Keyval,
}

impl Syntax {
    /// [`Syntax::Keyval`] if `keyval`, else [`Syntax::Json`].
    pub fn keyval_if(keyval: bool) -> Self {
        if keyval {
            Syntax::Keyval
        } else {
            Syntax::Json
        }
    }
}

/// QAPI's `size`: a byte count. From JSON read as `uint64`; from keyval QEMU's
/// `qemu_strtosz()` syntax (`4096`, `64k`, `1.5G`, `0x1000`). Use it for members that
/// QAPI declares as `size` (`uint64` members take no suffixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(pub u64);

/// The newtype name by which the deserializer recognises [`Size`].
const SIZE_NAME: &str = "qsd_qapi::Size";

impl<'de> de::Deserialize<'de> for Size {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("size")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_newtype_struct<D: de::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Size, D::Error> {
                <u64 as de::Deserialize>::deserialize(d).map(Size)
            }
        }
        d.deserialize_newtype_struct(SIZE_NAME, V)
    }
}

/// Deserialises any JSON value into `T` with QAPI's checks; the value itself
/// has no name (errors about it say `null`, as QEMU does for anonymous values).
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ArgumentError> {
    from_value_in(value, "", Syntax::Json)
}

/// Like [`from_value`] for a value of QEMU's keyval syntax ([`Syntax::Keyval`]):
/// its string scalars become the booleans, integers, numbers and sizes `T` asks for.
///
/// ```
/// #[derive(serde::Deserialize)]
/// #[serde(rename_all = "kebab-case")]
/// struct Opts { writable: Option<bool>, num_queues: Option<u16> }
///
/// let map = qsd_qapi::keyval::parse("writable=on,num-queues=0x10", None).unwrap();
/// let o: Opts = qsd_qapi::from_keyval(serde_json::Value::Object(map)).unwrap();
/// assert_eq!((o.writable, o.num_queues), (Some(true), Some(16)));
///
/// let map = qsd_qapi::keyval::parse("writable=maybe", None).unwrap();
/// let e = qsd_qapi::from_keyval::<Opts>(serde_json::Value::Object(map)).err().unwrap();
/// assert_eq!(e.to_string(), "Parameter 'writable' expects 'on' or 'off'");
/// ```
pub fn from_keyval<T: DeserializeOwned>(value: Value) -> Result<T, ArgumentError> {
    from_value_in(value, "", Syntax::Keyval)
}

/// Like [`from_value`] for a value found at `path` in the arguments (e.g.
/// `"addr.data"`), so that errors name members by their full path:
/// `Parameter 'addr.data.path' is missing`. Use it for the branch of a QAPI
/// union after looking at its discriminator.
pub fn from_value_at<T: DeserializeOwned>(value: Value, path: &str) -> Result<T, ArgumentError> {
    from_value_in(value, path, Syntax::Json)
}

/// [`from_value_at`] for a value of either [`Syntax`].
pub fn from_value_in<T: DeserializeOwned>(
    value: Value,
    path: &str,
    syntax: Syntax,
) -> Result<T, ArgumentError> {
    // A list element has no name of its own (QEMU says 'null').
    let name = path
        .rsplit('.')
        .next()
        .filter(|n| !n.is_empty() && !n.ends_with(']'))
        .map(str::to_string);
    let de = ValueDe {
        value,
        path: path.to_string(),
        name,
        capture: None,
        syntax,
    };
    T::deserialize(de).map_err(|e| e.locate(path, None).into_argument_error())
}

/// Deserialises the *base* of a QAPI flat union (the common members and the
/// discriminator, declared by the struct `B`) and returns it with the members
/// `B` does not declare, for the caller to parse as the variant chosen by
/// the discriminator with [`from_value`]. Unknown members are then
/// reported by that second step, as QAPI reports them after the variant's.
///
/// ```
/// # use qsd_qapi::{from_value, parse_base};
/// #[derive(serde::Deserialize)]
/// #[serde(rename_all = "kebab-case")]
/// enum Kind { Nbd, Fuse }
/// #[derive(serde::Deserialize)]
/// struct Base { id: String, #[serde(rename = "type")] kind: Kind }
/// #[derive(serde::Deserialize)]
/// struct Nbd { name: Option<String> }
///
/// let serde_json::Value::Object(args) = serde_json::json!(
///     {"id": "e0", "type": "nbd", "name": "x", "bogus": 1}) else { unreachable!() };
/// let (base, rest) = parse_base::<Base>(args).unwrap();
/// assert!(matches!(base.kind, Kind::Nbd));
/// let err = from_value::<Nbd>(serde_json::Value::Object(rest)).err().unwrap();
/// assert_eq!(err.to_string(), "Parameter 'bogus' is unexpected");
/// ```
pub fn parse_base<B: DeserializeOwned>(
    args: Map<String, Value>,
) -> Result<(B, Map<String, Value>), ArgumentError> {
    parse_base_in(args, Syntax::Json)
}

/// [`parse_base`] for arguments of either [`Syntax`].
pub fn parse_base_in<B: DeserializeOwned>(
    args: Map<String, Value>,
    syntax: Syntax,
) -> Result<(B, Map<String, Value>), ArgumentError> {
    let captured = Rc::new(Cell::new(&[][..]));
    let de = ValueDe {
        value: Value::Object(args.clone()),
        path: String::new(),
        name: None,
        capture: Some(captured.clone()),
        syntax,
    };
    let base = B::deserialize(de).map_err(|e| e.locate("", None).into_argument_error())?;
    let declared = captured.get();
    let rest = args
        .into_iter()
        .filter(|(k, _)| !declared.contains(&k.as_str()))
        .collect();
    Ok((base, rest))
}

/// A QAPI flat union (such as `SocketAddress` on `type`, or `BlockdevOptions` on
/// `driver`): the discriminator is read first, then the other members of the base, then
/// the members of the variant the discriminator selects, as QAPI reads them, so that
/// errors inside the variant name members by their full path, a missing member is
/// reported before an unexpected one, and keyval strings are converted. Implement it and
/// call [`deserialize_flat_union`] from `Deserialize::deserialize`.
///
/// ```
/// use serde::Deserialize;
/// use qsd_qapi::de::{deserialize_flat_union, FlatUnion, NoBase};
///
/// #[derive(Deserialize)]
/// #[serde(rename_all = "lowercase")]
/// enum Kind { Unix }
/// #[derive(Debug, Deserialize)]
/// struct Unix { path: String }
/// #[derive(Debug)]
/// enum Addr { Unix(Unix) }
///
/// impl FlatUnion for Addr {
///     const MEMBERS: &'static [&'static str] = &["type"];
///     type Tag = Kind;
///     type Base = NoBase;
///     fn variant<'de, D: serde::Deserializer<'de>>(
///         tag: Kind,
///         _base: NoBase,
///         rest: D,
///     ) -> Result<Self, D::Error> {
///         match tag { Kind::Unix => Unix::deserialize(rest).map(Addr::Unix) }
///     }
/// }
/// impl<'de> Deserialize<'de> for Addr {
///     fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
///         deserialize_flat_union(d)
///     }
/// }
///
/// let e = qsd_qapi::from_value::<Addr>(serde_json::json!({"type": "unix", "x": 1}));
/// assert_eq!(e.unwrap_err().to_string(), "Parameter 'path' is missing");
/// ```
pub trait FlatUnion: Sized {
    /// The discriminator (first), then the other members of the base, in schema order.
    const MEMBERS: &'static [&'static str];
    /// The discriminator's type: a QAPI enum.
    type Tag: DeserializeOwned;
    /// The base's members other than the discriminator ([`NoBase`] if none).
    type Base: DeserializeOwned;
    /// Reads the variant `tag` selects from the members that are not the base's.
    fn variant<'de, D: de::Deserializer<'de>>(
        tag: Self::Tag,
        base: Self::Base,
        rest: D,
    ) -> Result<Self, D::Error>;
}

/// The base of a [`FlatUnion`] that has no members besides its discriminator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct NoBase {}

/// The struct name by which the deserializer recognises a [`FlatUnion`].
const FLAT_UNION_NAME: &str = "qsd_qapi::FlatUnion";

/// The member under which the deserializer hands a [`FlatUnion`] its base's members
/// (without the discriminator), as one object at the union's own path.
const BASE_KEY: &str = "qsd_qapi::base";

/// The member under which the deserializer hands a [`FlatUnion`] the members that are
/// not the base's, as one object at the union's own path.
const REST_KEY: &str = "qsd_qapi::rest";

/// Deserialises a [`FlatUnion`]. With this crate's deserializer the base and the
/// variant are read in place (full paths, QAPI's order of checks, keyval conversion);
/// with any other, the members are gathered and read from `serde_json::Value`s.
pub fn deserialize_flat_union<'de, U: FlatUnion, D: de::Deserializer<'de>>(
    d: D,
) -> Result<U, D::Error> {
    struct Seed<U: FlatUnion>(U::Tag, U::Base);
    impl<'de, U: FlatUnion> DeserializeSeed<'de> for Seed<U> {
        type Value = U;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<U, D::Error> {
            U::variant(self.0, self.1, d)
        }
    }
    struct Flat<U>(std::marker::PhantomData<U>);
    impl<'de, U: FlatUnion> Visitor<'de> for Flat<U> {
        type Value = U;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<U, A::Error> {
            let tag_name = U::MEMBERS.first().copied().unwrap_or("type");
            let missing = || de::Error::missing_field(tag_name);
            let mut tag: Option<U::Tag> = None;
            let mut base: Option<U::Base> = None;
            let mut others = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if key == BASE_KEY {
                    if tag.is_none() {
                        return Err(missing());
                    }
                    base = Some(map.next_value()?);
                } else if key == REST_KEY {
                    let tag = tag.ok_or_else(missing)?;
                    let base = match base {
                        Some(b) => b,
                        None => {
                            <U::Base as de::Deserialize>::deserialize(Value::Object(Map::new()))
                                .map_err(de::Error::custom)?
                        }
                    };
                    return map.next_value_seed(Seed::<U>(tag, base));
                } else if key == tag_name && tag.is_none() {
                    tag = Some(map.next_value()?);
                } else {
                    others.insert(key, map.next_value()?);
                }
            }
            // Another deserializer: the members in whatever order it gave them.
            let tag = tag.ok_or_else(missing)?;
            let base_members = U::MEMBERS.get(1..).unwrap_or_default();
            let base: Map<String, Value> = base_members
                .iter()
                .filter_map(|m| others.remove_entry(*m))
                .collect();
            let base = <U::Base as de::Deserialize>::deserialize(Value::Object(base))
                .map_err(de::Error::custom)?;
            U::variant(tag, base, Value::Object(others)).map_err(de::Error::custom)
        }
    }
    d.deserialize_struct(FLAT_UNION_NAME, U::MEMBERS, Flat(std::marker::PhantomData))
}

/// The newtype name by which the deserializer recognises an alternate with an object
/// branch ([`deserialize_object_alternate`]).
const OBJECT_ALTERNATE_NAME: &str = "qsd_qapi::ObjectAlternate";

/// Deserialises a QAPI alternate one of whose branches is an object type (such as
/// `BlockdevRef`: a node name, or `BlockdevOptions` inline). With this crate's
/// deserializer, `visitor` gets `visit_newtype_struct` with a deserializer of the value
/// when it is an object (so that the object type is read in place: full paths, QAPI's
/// checks, keyval conversion), and its scalar methods (`visit_str`, `visit_unit`, ...)
/// otherwise; a type it refuses is `Invalid parameter type for 'PATH', expected: X`
/// with X what the visitor's `expecting` writes. Other deserializers call
/// `visit_newtype_struct` for any value.
pub fn deserialize_object_alternate<'de, D: de::Deserializer<'de>, V: Visitor<'de>>(
    d: D,
    visitor: V,
) -> Result<V::Value, D::Error> {
    d.deserialize_newtype_struct(OBJECT_ALTERNATE_NAME, visitor)
}

/// How serde reports that no variant of an untagged enum matched.
const UNTAGGED_PREFIX: &str = "data did not match any variant of untagged enum ";

/// An error while deserialising: either located, or raised by serde without
/// knowing where (located by the enclosing value's deserializer).
#[derive(Debug)]
enum DeError {
    Located(ArgumentError),
    MissingField(String),
    UnknownField(String),
    UnknownVariant(String),
    InvalidType(String),
    InvalidValue(String),
    Custom(String),
}

impl DeError {
    fn locate(self, path: &str, name: Option<&str>) -> Self {
        let own = name.unwrap_or("null").to_string();
        DeError::Located(match self {
            DeError::Located(e) => e,
            DeError::MissingField(f) => ArgumentError::Missing(join(path, &f)),
            DeError::UnknownField(f) => ArgumentError::Unexpected(join(path, &f)),
            DeError::UnknownVariant(v) => ArgumentError::InvalidEnumValue {
                name: own,
                value: v,
            },
            DeError::InvalidType(expected) => ArgumentError::InvalidType {
                path: if path.is_empty() {
                    own
                } else {
                    path.to_string()
                },
                expected,
            },
            DeError::InvalidValue(expected) => ArgumentError::InvalidValue {
                name: own,
                expected,
            },
            DeError::Custom(m) => match m.strip_prefix(UNTAGGED_PREFIX) {
                // QAPI alternates: QEMU names the member by its own name.
                Some(ty) => ArgumentError::InvalidType {
                    path: own,
                    expected: ty.to_string(),
                },
                None => ArgumentError::Custom(m),
            },
        })
    }

    fn into_argument_error(self) -> ArgumentError {
        match self {
            DeError::Located(e) => e,
            other => match other.locate("", None) {
                DeError::Located(e) => e,
                _ => ArgumentError::Custom("invalid arguments".into()),
            },
        }
    }
}

impl Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeError::Located(e) => e.fmt(f),
            DeError::MissingField(m) => write!(f, "missing member '{m}'"),
            DeError::UnknownField(m) => write!(f, "unexpected member '{m}'"),
            DeError::UnknownVariant(v) => write!(f, "unknown value '{v}'"),
            DeError::InvalidType(t) => write!(f, "invalid type, expected {t}"),
            DeError::InvalidValue(t) => write!(f, "invalid value, expected {t}"),
            DeError::Custom(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for DeError {}

/// QAPI's name for what serde says it expected.
fn qapi_type_name(exp: &dyn Expected) -> String {
    let s = exp.to_string();
    let t = s.as_str();
    let name = if t.contains("string") || t.contains("char") {
        "string"
    } else if t.contains("bool") {
        "boolean"
    } else if t.starts_with('i') && t[1..].chars().all(|c| c.is_ascii_digit())
        || t.starts_with('u') && t[1..].chars().all(|c| c.is_ascii_digit())
        || t.contains("integer")
    {
        "integer"
    } else if t.starts_with('f') && t[1..].chars().all(|c| c.is_ascii_digit())
        || t.contains("float")
        || t.contains("number")
    {
        "number"
    } else if t.contains("sequence") || t.contains("tuple") || t.contains("array") {
        "array"
    } else if t.contains("struct") || t.contains("map") || t.contains("object") {
        "object"
    } else if t.contains("unit") || t.contains("null") {
        "null"
    } else {
        return s;
    };
    name.to_string()
}

impl de::Error for DeError {
    fn custom<T: Display>(msg: T) -> Self {
        DeError::Custom(msg.to_string())
    }
    fn invalid_type(_unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        DeError::InvalidType(qapi_type_name(exp))
    }
    fn invalid_value(_unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        DeError::InvalidValue(exp.to_string())
    }
    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        DeError::UnknownVariant(variant.to_string())
    }
    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        DeError::UnknownField(field.to_string())
    }
    fn missing_field(field: &'static str) -> Self {
        DeError::MissingField(field.to_string())
    }
}

fn join(path: &str, member: &str) -> String {
    if path.is_empty() {
        member.to_string()
    } else {
        format!("{path}.{member}")
    }
}

/// A value, where it is (`path`), and its own name (`None` in a list).
struct ValueDe {
    value: Value,
    path: String,
    name: Option<String>,
    /// Set for the top level of [`parse_base`]: record the struct's declared
    /// members instead of refusing the others.
    capture: Option<Rc<Cell<&'static [&'static str]>>>,
    syntax: Syntax,
}

impl ValueDe {
    fn type_error(&self, expected: &str) -> DeError {
        DeError::Located(ArgumentError::InvalidType {
            path: if self.path.is_empty() {
                self.name.clone().unwrap_or_else(|| "null".into())
            } else {
                self.path.clone()
            },
            expected: expected.into(),
        })
    }

    fn own_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| "null".into())
    }

    fn range_error(&self, expected: &str) -> DeError {
        DeError::Located(ArgumentError::InvalidValue {
            name: self.own_name(),
            expected: expected.into(),
        })
    }

    /// The full name QEMU's messages give the value (its path, or its own name
    /// at the top).
    fn full_name(&self) -> String {
        if self.path.is_empty() {
            self.own_name()
        } else {
            self.path.clone()
        }
    }

    /// In keyval syntax, the string a scalar member must be (QEMU's
    /// `qobject_input_get_keyval()`); `None` in JSON syntax.
    fn keyval_str(&self) -> Option<Result<&str, DeError>> {
        if self.syntax != Syntax::Keyval {
            return None;
        }
        Some(match &self.value {
            Value::String(s) => Ok(s.as_str()),
            Value::Object(_) | Value::Array(_) => Err(DeError::Located(
                ArgumentError::UnexpectedNested(self.full_name()),
            )),
            _ => Err(self.type_error("string")),
        })
    }

    /// A keyval string that does not convert: `Parameter 'x' expects WHAT`.
    fn keyval_error(&self, expected: &str) -> DeError {
        DeError::Located(ArgumentError::InvalidValue {
            name: self.full_name(),
            expected: expected.into(),
        })
    }

    /// QAPI `int64`: any JSON integer that fits.
    fn int64(&self) -> Result<i64, DeError> {
        if let Some(s) = self.keyval_str() {
            return crate::keyval::parse_int64(s?).ok_or_else(|| self.keyval_error("integer"));
        }
        match &self.value {
            Value::Number(n) => n.as_i64().ok_or_else(|| self.type_error("integer")),
            _ => Err(self.type_error("integer")),
        }
    }

    /// QAPI `uint64`: a non-negative integer, or a negative one taken modulo
    /// 2^64; anything else "expects uint64" (named by path, as QEMU does).
    fn uint64(&self) -> Result<u64, DeError> {
        if let Some(s) = self.keyval_str() {
            return crate::keyval::parse_uint64(s?).ok_or_else(|| self.keyval_error("integer"));
        }
        let n = match &self.value {
            Value::Number(n) => n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)),
            _ => None,
        };
        n.ok_or_else(|| self.keyval_error("uint64"))
    }

    /// QAPI `size`: `uint64` from JSON (`Parameter 'x' expects uint64`, as QSD
    /// says); QEMU's `qemu_strtosz()` from keyval.
    fn size(&self) -> Result<u64, DeError> {
        if let Some(s) = self.keyval_str() {
            return crate::keyval::parse_size(s?).ok_or_else(|| self.keyval_error("size"));
        }
        self.uint64()
    }

    fn signed<T: TryFrom<i64>>(&self, what: &str) -> Result<T, DeError> {
        T::try_from(self.int64()?).map_err(|_| self.range_error(what))
    }

    fn unsigned<T: TryFrom<u64>>(&self, what: &str) -> Result<T, DeError> {
        T::try_from(self.uint64()?).map_err(|_| self.range_error(what))
    }

    fn locate<T>(&self, r: Result<T, DeError>) -> Result<T, DeError> {
        r.map_err(|e| e.locate(&self.path, self.name.as_deref()))
    }
}

macro_rules! int_methods {
    ($($method:ident, $visit:ident, $ty:ty, $how:ident, $what:expr;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let v: $ty = self.$how($what)?;
            let r = visitor.$visit(v);
            self.locate(r)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for ValueDe {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let (path, name) = (self.path.clone(), self.name.clone());
        let r = match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_string(s),
            Value::Array(a) => visit_array(a, &path, self.syntax, visitor),
            Value::Object(m) => visitor.visit_map(ObjectAccess::new(m, &path, self.syntax)),
        };
        r.map_err(|e| e.locate(&path, name.as_deref()))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Some(s) = self.keyval_str() {
            let b =
                crate::keyval::parse_bool(s?).ok_or_else(|| self.keyval_error("'on' or 'off'"))?;
            let r = visitor.visit_bool(b);
            return self.locate(r);
        }
        match self.value {
            Value::Bool(b) => {
                let r = visitor.visit_bool(b);
                self.locate(r)
            }
            _ => Err(self.type_error("boolean")),
        }
    }

    int_methods! {
        deserialize_i8, visit_i8, i8, signed, "int8_t";
        deserialize_i16, visit_i16, i16, signed, "int16_t";
        deserialize_i32, visit_i32, i32, signed, "int32_t";
        deserialize_u8, visit_u8, u8, unsigned, "uint8_t";
        deserialize_u16, visit_u16, u16, unsigned, "uint16_t";
        deserialize_u32, visit_u32, u32, unsigned, "uint32_t";
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let v = self.int64()?;
        let r = visitor.visit_i64(v);
        self.locate(r)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let v = self.uint64()?;
        let r = visitor.visit_u64(v);
        self.locate(r)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Some(s) = self.keyval_str() {
            let v = crate::keyval::parse_number(s?).ok_or_else(|| self.type_error("number"))?;
            let r = visitor.visit_f64(v);
            return self.locate(r);
        }
        match &self.value {
            Value::Number(n) => {
                let v = n.as_f64().unwrap_or(f64::NAN);
                let r = visitor.visit_f64(v);
                self.locate(r)
            }
            _ => Err(self.type_error("number")),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Some(Err(e)) = self.keyval_str() {
            return Err(e);
        }
        match self.value {
            Value::String(ref s) => {
                let r = visitor.visit_string(s.clone());
                self.locate(r)
            }
            _ => Err(self.type_error("string")),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // QAPI: a present optional member must be valid; `null` is not "absent".
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Null => {
                let r = visitor.visit_unit();
                self.locate(r)
            }
            _ => Err(self.type_error("null")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if name == OBJECT_ALTERNATE_NAME {
            return if self.value.is_object() {
                visitor.visit_newtype_struct(self)
            } else {
                self.deserialize_any(visitor)
            };
        }
        if name == SIZE_NAME {
            let v = self.size()?;
            let r = visitor.visit_u64(v);
            return self.locate(r);
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Array(a) => {
                let r = visit_array(a, &self.path, self.syntax, visitor);
                r.map_err(|e| e.locate(&self.path, self.name.as_deref()))
            }
            _ => Err(self.type_error("array")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Object(m) => {
                let r = visitor.visit_map(ObjectAccess::new(m, &self.path, self.syntax));
                r.map_err(|e| e.locate(&self.path, self.name.as_deref()))
            }
            _ => Err(self.type_error("object")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if name == FLAT_UNION_NAME {
            let Value::Object(mut m) = self.value else {
                return Err(self.type_error("object"));
            };
            let mut entries = Vec::with_capacity(3);
            if let Some(e) = fields.first().and_then(|tag| m.remove_entry(*tag)) {
                entries.push(e);
            }
            let base: Map<String, Value> = fields
                .get(1..)
                .unwrap_or_default()
                .iter()
                .filter_map(|f| m.remove_entry(*f))
                .collect();
            entries.push((BASE_KEY.to_string(), Value::Object(base)));
            entries.push((REST_KEY.to_string(), Value::Object(m)));
            let access = ObjectAccess {
                iter: entries.into_iter(),
                pending: None,
                path: self.path.clone(),
                syntax: self.syntax,
                name: self.name.clone(),
            };
            let r = visitor.visit_map(access);
            return r.map_err(|e| e.locate(&self.path, self.name.as_deref()));
        }
        match self.value {
            Value::Object(m) => {
                // QAPI refuses members a struct does not declare; it reports
                // them after the declared members were checked.
                let unknown = match &self.capture {
                    Some(c) => {
                        c.set(fields);
                        None
                    }
                    None => qdict_keys(&m)
                        .find(|k| !fields.contains(&k.as_str()))
                        .cloned(),
                };
                let r =
                    visitor.visit_map(ObjectAccess::ordered(m, fields, &self.path, self.syntax));
                let v = r.map_err(|e| e.locate(&self.path, self.name.as_deref()))?;
                match unknown {
                    Some(k) => Err(DeError::Located(ArgumentError::Unexpected(join(
                        &self.path, &k,
                    )))),
                    None => Ok(v),
                }
            }
            _ => Err(self.type_error("object")),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let (path, name) = (self.path.clone(), self.name.clone());
        if let Some(Err(e)) = self.keyval_str() {
            return Err(e);
        }
        let r = match self.value {
            Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            Value::Object(m) if m.len() == 1 => visitor.visit_enum(TaggedEnum {
                map: m,
                path: path.clone(),
                syntax: self.syntax,
            }),
            _ => return Err(self.type_error("string")),
        };
        r.map_err(|e| e.locate(&path, name.as_deref()))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

fn visit_array<'de, V: Visitor<'de>>(
    a: Vec<Value>,
    path: &str,
    syntax: Syntax,
    visitor: V,
) -> Result<V::Value, DeError> {
    let len = a.len();
    let mut access = ArrayAccess {
        iter: a.into_iter().enumerate(),
        path: path.to_string(),
        syntax,
    };
    let v = visitor.visit_seq(&mut access)?;
    if access.iter.next().is_some() {
        return Err(DeError::Custom(format!(
            "Parameter '{path}' has too many elements ({len})"
        )));
    }
    Ok(v)
}

struct ArrayAccess {
    iter: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    path: String,
    syntax: Syntax,
}

impl<'de> SeqAccess<'de> for &mut ArrayAccess {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.iter.next() {
            Some((i, value)) => {
                // QEMU names a list element `list[1]` in JSON, `list.1` in keyval.
                let path = match self.syntax {
                    Syntax::Json => format!("{}[{i}]", self.path),
                    Syntax::Keyval => format!("{}.{i}", self.path),
                };
                // Errors raised after the element's deserializer returned
                // (untagged enums, validating impls) are located here.
                seed.deserialize(ValueDe {
                    value,
                    path: path.clone(),
                    name: None,
                    capture: None,
                    syntax: self.syntax,
                })
                .map(Some)
                .map_err(|e| e.locate(&path, None))
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct ObjectAccess {
    iter: std::vec::IntoIter<(String, Value)>,
    pending: Option<(String, Value)>,
    path: String,
    syntax: Syntax,
    /// The object's own name, for the members of a [`FlatUnion`]'s variant
    /// (read in place, at the object's path).
    name: Option<String>,
}

impl ObjectAccess {
    fn new(map: Map<String, Value>, path: &str, syntax: Syntax) -> Self {
        Self::ordered(map, &[], path, syntax)
    }

    /// Members in the struct's declaration order first (as QAPI visits them
    /// in schema order, so the first error reported is QEMU's, and so that a
    /// tag is seen before its content), then the others.
    fn ordered(mut map: Map<String, Value>, fields: &[&str], path: &str, syntax: Syntax) -> Self {
        let mut entries = Vec::with_capacity(map.len());
        for f in fields {
            if let Some(e) = map.remove_entry(*f) {
                entries.push(e);
            }
        }
        entries.extend(map);
        Self {
            iter: entries.into_iter(),
            pending: None,
            path: path.to_string(),
            syntax,
            name: None,
        }
    }
}

impl<'de> MapAccess<'de> for ObjectAccess {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.iter.next() {
            Some((k, v)) => {
                let key = seed.deserialize(k.clone().into_deserializer())?;
                self.pending = Some((k, v));
                Ok(Some(key))
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (k, value) = self
            .pending
            .take()
            .ok_or_else(|| DeError::Custom("value requested before key".into()))?;
        if k == REST_KEY || k == BASE_KEY {
            return seed.deserialize(ValueDe {
                value,
                path: self.path.clone(),
                name: self.name.clone(),
                capture: None,
                syntax: self.syntax,
            });
        }
        let path = join(&self.path, &k);
        seed.deserialize(ValueDe {
            value,
            path: path.clone(),
            name: Some(k.clone()),
            capture: None,
            syntax: self.syntax,
        })
        .map_err(|e| e.locate(&path, Some(&k)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// An externally tagged enum: `{"variant": content}`.
struct TaggedEnum {
    map: Map<String, Value>,
    path: String,
    syntax: Syntax,
}

impl<'de> EnumAccess<'de> for TaggedEnum {
    type Error = DeError;
    type Variant = ValueDe;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, ValueDe), DeError> {
        let (k, value) = self
            .map
            .into_iter()
            .next()
            .ok_or_else(|| DeError::Custom("empty enum object".into()))?;
        let variant = seed.deserialize(k.clone().into_deserializer())?;
        Ok((
            variant,
            ValueDe {
                value,
                path: join(&self.path, &k),
                name: Some(k),
                capture: None,
                syntax: self.syntax,
            },
        ))
    }
}

impl<'de> VariantAccess<'de> for ValueDe {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        de::Deserialize::deserialize(self)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    enum Mode {
        Safe,
        Hard,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Del {
        id: String,
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct UnixData {
        path: String,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Addr {
        #[serde(rename = "type")]
        kind: String,
        data: UnixData,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Start {
        addr: Addr,
        max_connections: Option<u32>,
        size: Option<i64>,
        big: Option<u64>,
        flag: Option<bool>,
        ratio: Option<f64>,
        bitmaps: Option<Vec<Bitmap>>,
        modes: Option<Vec<Mode>>,
        small: Option<i8>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Bitmap {
        node: String,
        name: String,
    }

    fn err<T: DeserializeOwned + std::fmt::Debug>(v: Value) -> String {
        let Value::Object(m) = v else {
            panic!("not an object")
        };
        from_value::<T>(Value::Object(m)).unwrap_err().to_string()
    }

    fn start(extra: Value) -> Value {
        let mut v = json!({"addr": {"type": "unix", "data": {"path": "/p"}}});
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
            m.extend(e);
        }
        v
    }

    // Each expectation below was observed from qemu-storage-daemon 10.0 with
    // block-export-del and nbd-server-start.
    #[test]
    fn missing_member() {
        assert_eq!(err::<Del>(json!({})), "Parameter 'id' is missing");
        assert_eq!(
            err::<Start>(json!({"addr": {"type": "unix", "data": {}}})),
            "Parameter 'addr.data.path' is missing"
        );
        assert_eq!(
            err::<Start>(json!({"addr": {"type": "unix"}})),
            "Parameter 'addr.data' is missing"
        );
        assert_eq!(
            err::<Start>(start(
                json!({"bitmaps": [{"node": "n", "name": "b"}, {"node": "n"}]})
            )),
            "Parameter 'bitmaps[1].name' is missing"
        );
    }

    #[test]
    fn unexpected_member() {
        assert_eq!(
            err::<Del>(json!({"id": "x", "extra": 1})),
            "Parameter 'extra' is unexpected"
        );
        assert_eq!(
            err::<Start>(json!({"addr": {"type": "unix", "data": {"path": "/a", "zz": 1}}})),
            "Parameter 'addr.data.zz' is unexpected"
        );
        assert_eq!(
            err::<Start>(start(
                json!({"bitmaps": [{"node": "n", "name": "b", "q": 1}]})
            )),
            "Parameter 'bitmaps[0].q' is unexpected"
        );
    }

    #[test]
    fn wrong_type() {
        assert_eq!(
            err::<Del>(json!({"id": 1})),
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            err::<Del>(json!({"id": null})),
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            err::<Del>(json!({"id": "x", "mode": 1})),
            "Invalid parameter type for 'mode', expected: string"
        );
        assert_eq!(
            err::<Start>(json!({"addr": {"type": "unix", "data": {"path": 1}}})),
            "Invalid parameter type for 'addr.data.path', expected: string"
        );
        assert_eq!(
            err::<Start>(start(json!({"size": "x"}))),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            err::<Start>(start(json!({"size": true}))),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            err::<Start>(start(json!({"flag": "yes"}))),
            "Invalid parameter type for 'flag', expected: boolean"
        );
        assert_eq!(
            err::<Start>(start(json!({"bitmaps": "a"}))),
            "Invalid parameter type for 'bitmaps', expected: array"
        );
        assert_eq!(
            err::<Start>(start(json!({"bitmaps": [{"node": 1, "name": "b"}]}))),
            "Invalid parameter type for 'bitmaps[0].node', expected: string"
        );
        assert_eq!(
            err::<Start>(json!({"addr": 1})),
            "Invalid parameter type for 'addr', expected: object"
        );
        assert_eq!(
            err::<Start>(start(json!({"ratio": "x"}))),
            "Invalid parameter type for 'ratio', expected: number"
        );
    }

    #[test]
    fn enum_values() {
        assert_eq!(
            err::<Del>(json!({"id": "x", "mode": "foo"})),
            "Parameter 'mode' does not accept value 'foo'"
        );
        // QEMU names a list element 'null' (qmp_capabilities enable: ["foo"]).
        assert_eq!(
            err::<Start>(start(json!({"modes": ["safe", "foo"]}))),
            "Parameter 'null' does not accept value 'foo'"
        );
    }

    #[test]
    fn integer_ranges() {
        assert_eq!(
            err::<Start>(start(json!({"max-connections": "x"}))),
            "Parameter 'max-connections' expects uint64"
        );
        assert_eq!(
            err::<Start>(start(json!({"max-connections": 1.5}))),
            "Parameter 'max-connections' expects uint64"
        );
        assert_eq!(
            err::<Start>(start(json!({"max-connections": -1}))),
            "Parameter 'max-connections' expects uint32_t"
        );
        assert_eq!(
            err::<Start>(start(json!({"max-connections": 4294967296u64}))),
            "Parameter 'max-connections' expects uint32_t"
        );
        assert_eq!(
            err::<Start>(start(json!({"small": 128}))),
            "Parameter 'small' expects int8_t"
        );
    }

    #[test]
    fn valid_arguments_deserialize() {
        let Value::Object(m) = start(json!({"max-connections": 4, "big": -1, "ratio": 2,
            "bitmaps": [{"node": "n", "name": "b"}], "modes": ["hard"]}))
        else {
            unreachable!()
        };
        let s: Start = from_value(Value::Object(m)).unwrap();
        assert_eq!(s.max_connections, Some(4));
        assert_eq!(s.big, Some(u64::MAX));
        assert_eq!(s.ratio, Some(2.0));
        assert_eq!(s.addr.data.path, "/p");
        assert!(matches!(s.modes.as_deref(), Some([Mode::Hard])));
        let v: Value = from_value(json!({"any": [1, "x", null]})).unwrap();
        assert_eq!(v, json!({"any": [1, "x", null]}));
    }

    #[test]
    fn flat_union_base_then_variant() {
        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        enum Kind {
            Nbd,
            Fuse,
        }
        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        #[allow(dead_code)]
        struct Base {
            id: String,
            #[serde(rename = "type")]
            kind: Kind,
            node_name: String,
            writable: Option<bool>,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Nbd {
            name: Option<String>,
        }
        fn obj(v: Value) -> Map<String, Value> {
            let Value::Object(m) = v else { panic!() };
            m
        }
        let (base, rest) = parse_base::<Base>(obj(
            json!({"id": "e", "type": "nbd", "node-name": "n", "name": "x"}),
        ))
        .unwrap();
        assert!(matches!(base.kind, Kind::Nbd));
        assert_eq!(Value::Object(rest.clone()), json!({"name": "x"}));
        assert_eq!(
            from_value::<Nbd>(Value::Object(rest))
                .unwrap()
                .name
                .as_deref(),
            Some("x")
        );
        // As observed from QSD's block-export-add.
        let e = |v| parse_base::<Base>(obj(v)).unwrap_err().to_string();
        assert_eq!(
            e(json!({"id": "e", "node-name": "n"})),
            "Parameter 'type' is missing"
        );
        assert_eq!(
            e(json!({"type": "nbd", "node-name": "n"})),
            "Parameter 'id' is missing"
        );
        assert_eq!(
            e(json!({"id": "e", "type": "bogus", "node-name": "n"})),
            "Parameter 'type' does not accept value 'bogus'"
        );
        assert_eq!(
            e(json!({"id": "e", "type": "fuse", "node-name": "n", "writable": "yes"})),
            "Invalid parameter type for 'writable', expected: boolean"
        );
        let (_, rest) = parse_base::<Base>(obj(
            json!({"id": "e", "type": "nbd", "node-name": "n", "q": 1}),
        ))
        .unwrap();
        assert_eq!(
            from_value::<Nbd>(Value::Object(rest))
                .unwrap_err()
                .to_string(),
            "Parameter 'q' is unexpected"
        );
    }

    #[test]
    fn values_at_a_path() {
        assert_eq!(
            from_value_at::<UnixData>(json!({}), "addr.data")
                .unwrap_err()
                .to_string(),
            "Parameter 'addr.data.path' is missing"
        );
        assert_eq!(
            from_value_at::<UnixData>(json!(1), "addr.data")
                .unwrap_err()
                .to_string(),
            "Invalid parameter type for 'addr.data', expected: object"
        );
        assert_eq!(
            from_value_at::<Mode>(json!("x"), "modes[0]")
                .unwrap_err()
                .to_string(),
            "Parameter 'null' does not accept value 'x'"
        );
        assert_eq!(
            from_value_at::<Mode>(json!("x"), "mode")
                .unwrap_err()
                .to_string(),
            "Parameter 'mode' does not accept value 'x'"
        );
    }

    #[test]
    fn serde_enum_representations() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Unix {
            path: String,
        }
        /// Adjacently tagged: QAPI's legacy `{"type": .., "data": {..}}`.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "type", content = "data", rename_all = "lowercase")]
        #[allow(dead_code)]
        enum LegacyAddr {
            Unix(Unix),
        }
        /// Untagged: a QAPI alternate, named after it for QEMU's message.
        #[derive(Debug, Deserialize)]
        #[serde(untagged)]
        #[allow(dead_code, clippy::enum_variant_names)]
        enum BlockDirtyBitmapOrStr {
            Name(String),
            Qualified { node: String, name: String },
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Args {
            addr: LegacyAddr,
            bitmaps: Option<Vec<BlockDirtyBitmapOrStr>>,
        }
        let ok = json!({"addr": {"type": "unix", "data": {"path": "/p"}}});
        let Value::Object(m) = ok.clone() else {
            unreachable!()
        };
        assert!(from_value::<Args>(Value::Object(m)).is_ok());
        // Each as QSD 10.0 says it for nbd-server-start / block-export-add.
        assert_eq!(
            err::<Args>(json!({"addr": {"type": "unix", "data": {"path": 1}}})),
            "Invalid parameter type for 'addr.data.path', expected: string"
        );
        assert_eq!(
            err::<Args>(json!({"addr": {"type": "unix", "data": {}}})),
            "Parameter 'addr.data.path' is missing"
        );
        assert_eq!(
            err::<Args>(json!({"addr": {"type": "unix", "data": {"path": "/p", "zz": 1}}})),
            "Parameter 'addr.data.zz' is unexpected"
        );
        assert_eq!(
            err::<Args>(json!({"addr": {"type": "unix"}})),
            "Parameter 'addr.data' is missing"
        );
        assert_eq!(
            err::<Args>(json!({"addr": {"type": "bogus"}})),
            "Parameter 'type' does not accept value 'bogus'"
        );
        let with = |b: Value| {
            let mut v = ok.clone();
            v["bitmaps"] = b;
            v
        };
        assert_eq!(
            err::<Args>(with(json!([1]))),
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
        );
        assert_eq!(
            err::<Args>(with(json!("a"))),
            "Invalid parameter type for 'bitmaps', expected: array"
        );
        let Value::Object(m) = with(json!(["a", {"node": "n", "name": "b"}])) else {
            unreachable!()
        };
        assert!(from_value::<Args>(Value::Object(m)).is_ok());
    }

    #[test]
    fn internally_tagged_enums_lose_inner_names() {
        // Documented limitation: serde buffers these before we see members.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "type", rename_all = "lowercase")]
        #[allow(dead_code)]
        enum Addr {
            Unix { path: String },
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Args {
            addr: Addr,
        }
        assert_eq!(
            err::<Args>(json!({"addr": {"type": "unix"}})),
            "Parameter 'addr.path' is missing"
        );
        assert_eq!(
            err::<Args>(json!({"addr": {"type": "unix", "path": 1}})),
            "Invalid parameter type for 'addr', expected: string"
        );
        assert_eq!(
            err::<Args>(json!({"addr": {"type": "bogus"}})),
            "Parameter 'type' does not accept value 'bogus'"
        );
    }

    #[test]
    fn first_error_in_declaration_order() {
        // QAPI visits members in schema order: with two bad members, the
        // first declared is reported, whatever the input order.
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Two {
            zeta: String,
            alpha: bool,
        }
        assert_eq!(
            err::<Two>(json!({"alpha": 1, "zeta": 2})),
            "Invalid parameter type for 'zeta', expected: string"
        );
    }

    #[test]
    fn maps_and_tagged_enums_keep_paths() {
        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        #[allow(dead_code)]
        enum Ext {
            Inet { host: String },
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct W {
            m: std::collections::BTreeMap<String, u8>,
            e: Option<Ext>,
        }
        assert_eq!(
            err::<W>(json!({"m": {"a": 1, "b": "x"}})),
            "Parameter 'm.b' expects uint64"
        );
        assert_eq!(
            err::<W>(json!({"m": {}, "e": {"inet": {}}})),
            "Parameter 'e.inet.host' is missing"
        );
    }

    /// Keyval mode: strings become the scalars asked for, with the messages of QEMU's
    /// keyval input visitor (checked against qemu-storage-daemon 10.0).
    mod keyval_mode {
        use super::*;
        use crate::keyval;

        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(rename_all = "kebab-case")]
        struct Inet {
            host: Option<String>,
            port: Option<u16>,
            numeric: Option<bool>,
        }

        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(rename_all = "kebab-case")]
        struct Rule {
            policy: Option<bool>,
        }

        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(rename_all = "kebab-case")]
        struct Opts {
            addr: Option<Inet>,
            max_connections: Option<u32>,
            rules: Option<Vec<Rule>>,
            big: Option<u64>,
            n: Option<i32>,
            i: Option<i64>,
            x: Option<f64>,
            size: Option<Size>,
            path: Option<String>,
            mode: Option<Mode>,
            flag: Option<bool>,
        }

        fn kv(input: &str) -> Result<Opts, String> {
            let map = keyval::parse(input, None).map_err(|e| e.to_string())?;
            from_keyval(Value::Object(map)).map_err(|e| e.to_string())
        }

        fn fails(input: &str) -> String {
            kv(input).unwrap_err()
        }

        #[test]
        fn scalars_convert() {
            let o = kv(
                "addr.host=h,addr.port=0x10,addr.numeric=yes,max-connections=4,\
                        rules.0.policy=on,rules.1.policy=n,big=-1,n=-0x10,i= 010,x=1.5,\
                        size=1.5k,path=p,mode=hard,flag=true",
            )
            .unwrap();
            assert_eq!(
                o.addr,
                Some(Inet {
                    host: Some("h".into()),
                    port: Some(16),
                    numeric: Some(true)
                })
            );
            assert_eq!(o.max_connections, Some(4));
            assert_eq!(
                o.rules,
                Some(vec![
                    Rule { policy: Some(true) },
                    Rule {
                        policy: Some(false)
                    }
                ])
            );
            assert_eq!(
                (o.big, o.n, o.i, o.x),
                (Some(u64::MAX), Some(-16), Some(8), Some(1.5))
            );
            assert_eq!(o.size, Some(Size(1536)));
            assert_eq!(o.mode, Some(Mode::Hard));
            assert_eq!((o.path.as_deref(), o.flag), (Some("p"), Some(true)));
        }

        #[test]
        fn qemu_messages() {
            let cases = [
                ("flag=maybe", "Parameter 'flag' expects 'on' or 'off'"),
                ("flag=ON", "Parameter 'flag' expects 'on' or 'off'"),
                (
                    "addr.numeric=1",
                    "Parameter 'addr.numeric' expects 'on' or 'off'",
                ),
                (
                    "max-connections=abc",
                    "Parameter 'max-connections' expects integer",
                ),
                (
                    "max-connections=-1",
                    "Parameter 'max-connections' expects uint32_t",
                ),
                (
                    "max-connections=0x1ffffffff",
                    "Parameter 'max-connections' expects uint32_t",
                ),
                ("addr.port=70000", "Parameter 'port' expects uint16_t"),
                (
                    "big=18446744073709551616",
                    "Parameter 'big' expects integer",
                ),
                ("i=1k", "Parameter 'i' expects integer"),
                ("i=99999999999999999999", "Parameter 'i' expects integer"),
                ("n=2147483648", "Parameter 'n' expects int32_t"),
                ("size=1q", "Parameter 'size' expects size"),
                ("size=-1", "Parameter 'size' expects size"),
                ("x=abc", "Invalid parameter type for 'x', expected: number"),
                ("path.x=1", "Parameters 'path.*' are unexpected"),
                (
                    "max-connections.0=1",
                    "Parameters 'max-connections.*' are unexpected",
                ),
                ("mode.a=1", "Parameters 'mode.*' are unexpected"),
                ("mode=x", "Parameter 'mode' does not accept value 'x'"),
                (
                    "addr=x",
                    "Invalid parameter type for 'addr', expected: object",
                ),
                ("bogus=1", "Parameter 'bogus' is unexpected"),
            ];
            for (input, msg) in cases {
                assert_eq!(fails(input), msg, "{input}");
            }
            // List elements are named `list.N` (QSD: `Parameters 'rules.0.match.*' are
            // unexpected`).
            assert_eq!(
                fails("rules.0.policy=on,rules.1.policy=maybe"),
                "Parameter 'rules.1.policy' expects 'on' or 'off'"
            );
        }

        #[test]
        fn json_values_are_not_converted() {
            // JSON syntax: strings are not scalars of other types, as QEMU's JSON input.
            let e = from_value::<Opts>(json!({"flag": "on"}))
                .unwrap_err()
                .to_string();
            assert_eq!(e, "Invalid parameter type for 'flag', expected: boolean");
            let e = from_value::<Opts>(json!({"size": "1k"}))
                .unwrap_err()
                .to_string();
            assert_eq!(e, "Parameter 'size' expects uint64");
            assert_eq!(
                from_value::<Opts>(json!({"size": 4096})).unwrap().size,
                Some(Size(4096))
            );
            // Keyval syntax has only strings; any other scalar is QEMU's type error.
            let e = from_keyval::<Opts>(json!({"flag": true}))
                .unwrap_err()
                .to_string();
            assert_eq!(e, "Invalid parameter type for 'flag', expected: string");
        }

        #[test]
        fn flat_unions_and_bases_in_keyval() {
            let map = keyval::parse("type=nbd,id=e0,name=x,flag=off", None).unwrap();
            #[derive(Deserialize)]
            struct Base {
                id: String,
            }
            #[derive(Debug, Deserialize)]
            #[allow(dead_code)]
            struct Nbd {
                #[serde(rename = "type")]
                kind: String,
                name: Option<String>,
                flag: Option<bool>,
            }
            let (base, rest) = parse_base_in::<Base>(map, Syntax::Keyval).unwrap();
            assert_eq!(base.id, "e0");
            let nbd: Nbd = from_value_in(Value::Object(rest), "", Syntax::Keyval).unwrap();
            assert_eq!(nbd.flag, Some(false));
        }
    }
}
