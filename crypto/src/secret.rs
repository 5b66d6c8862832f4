//! The `secret` object, as QEMU's `crypto/secret.c` and `crypto/secret_common.c` make it:
//! bytes given inline (`data`) or read from a file (`file`), `raw` or `base64`, and optionally
//! encrypted with AES-256-CBC under another secret (`keyid`, the key: 32 bytes; `iv`: 16
//! bytes in base64).
//!
//! Other objects take a secret's bytes by id through [`Secrets`] (a TLS key's password, a
//! network driver's key): the caller's object store implements it.
//!
//! Base64 is decoded as QEMU decodes it: only the base64 alphabet, `=` and newlines are
//! allowed, then GLib's lenient decoder runs (an incomplete last group is dropped).

use std::path::PathBuf;

use aws_lc_rs::cipher::{DecryptingKey, DecryptionContext, UnboundCipherKey, AES_256};
use aws_lc_rs::iv::FixedLength;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `QCryptoSecretFormat`: how the data or file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretFormat {
    /// The bytes as they are (default).
    #[default]
    Raw,
    /// Base64 text.
    Base64,
}

/// The properties of a `secret` object (`SecretProperties` in QAPI, in QAPI's order); the
/// object's `id` is not one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SecretOptions {
    /// How `data` or the file's contents are encoded.
    #[serde(default)]
    pub format: SecretFormat,
    /// The id of the secret that holds the AES-256 key the data is encrypted with.
    pub keyid: Option<String>,
    /// The CBC initialization vector, base64 (with `keyid`).
    pub iv: Option<String>,
    /// The secret inline.
    pub data: Option<String>,
    /// A file holding the secret.
    pub file: Option<PathBuf>,
}

impl SecretOptions {
    /// A raw secret given inline.
    pub fn data(data: impl Into<String>) -> Self {
        SecretOptions {
            data: Some(data.into()),
            ..SecretOptions::default()
        }
    }
}

/// Why a secret could not be loaded or looked up, in QEMU's words.
#[derive(Debug, Error)]
pub enum SecretError {
    /// Both `file` and `data`.
    #[error("'file' and 'data' are mutually exclusive")]
    FileAndData,
    /// Neither `file` nor `data`.
    #[error("Either 'file' or 'data' must be provided")]
    NoData,
    /// The file cannot be read (GLib's `g_file_get_contents` wording).
    #[error("Unable to read {}: Failed to open file “{}”: {}", path.display(), path.display(), qsd_qapi::strerror(cause))]
    Read {
        /// The file.
        path: PathBuf,
        /// Why: part of the message, as GLib words it, so not a `source`.
        cause: std::io::Error,
    },
    /// No object with the id (`keyid`, or a lookup).
    #[error("No secret with id '{0}'")]
    NotFound(String),
    /// The object with the id is not a secret.
    #[error("Object with id '{0}' is not a secret")]
    NotASecret(String),
    /// The secret with the id has no data (yet).
    #[error("Secret with id '{0}' has no data")]
    Empty(String),
    /// The key secret is not 32 bytes.
    #[error("Key should be 32 bytes in length")]
    KeyLength,
    /// `keyid` without `iv`.
    #[error("IV is required to decrypt secret")]
    NoIv,
    /// The IV is not 16 bytes.
    #[error("IV should be 16 bytes in length not {0}")]
    IvLength(usize),
    /// Base64 input with a NUL byte.
    #[error("Base64 data contains embedded NUL characters")]
    Base64Nul,
    /// Base64 input with a character outside the alphabet.
    #[error("Base64 data contains invalid characters")]
    Base64Invalid,
    /// Ciphertext that is not whole AES blocks.
    #[error("Length {0} must be a multiple of block size 16")]
    BlockLength(usize),
    /// The decryption failed.
    #[error("Cannot decrypt the secret")]
    Decrypt,
    /// The last decrypted byte is not a valid padding length.
    #[error("Incorrect number of padding bytes ({0}) found on decrypted data")]
    Padding(u8),
    /// The secret is not UTF-8 where text is needed.
    #[error("Data from secret {0} is not valid UTF-8")]
    NotUtf8(String),
}

/// Where secrets are found by id: the caller's object store.
pub trait Secrets {
    /// The bytes of secret `id`: [`SecretError::NotFound`] if there is no object `id`,
    /// [`SecretError::NotASecret`] if it is another kind of object.
    fn secret(&self, id: &str) -> Result<Vec<u8>, SecretError>;

    /// The secret as text ([`SecretError::NotUtf8`] if it is not).
    fn secret_utf8(&self, id: &str) -> Result<String, SecretError> {
        String::from_utf8(self.secret(id)?).map_err(|_| SecretError::NotUtf8(id.to_string()))
    }
}

/// No secrets at all (every lookup is [`SecretError::NotFound`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSecrets;

impl Secrets for NoSecrets {
    fn secret(&self, id: &str) -> Result<Vec<u8>, SecretError> {
        Err(SecretError::NotFound(id.to_string()))
    }
}

/// A loaded `secret` object.
pub struct Secret {
    options: SecretOptions,
    value: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value, nor inline data.
        f.debug_struct("Secret")
            .field("format", &self.options.format)
            .field("keyid", &self.options.keyid)
            .field("file", &self.options.file)
            .field("len", &self.value.len())
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// Loads the secret as QEMU does at creation; `keys` finds the key of `keyid`.
    pub fn new(options: SecretOptions, keys: &dyn Secrets) -> Result<Secret, SecretError> {
        let input = match (&options.file, &options.data) {
            (Some(_), Some(_)) => return Err(SecretError::FileAndData),
            (Some(path), None) => std::fs::read(path).map_err(|cause| SecretError::Read {
                path: path.clone(),
                cause,
            })?,
            (None, Some(data)) => data.as_bytes().to_vec(),
            (None, None) => return Err(SecretError::NoData),
        };
        let value = match &options.keyid {
            Some(keyid) => decrypt(&options, keyid, &input, keys)?,
            None if options.format == SecretFormat::Base64 => base64_decode(&input)?,
            None => input,
        };
        Ok(Secret { options, value })
    }

    /// The secret's bytes.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The properties it was created with.
    pub fn options(&self) -> &SecretOptions {
        &self.options
    }
}

/// `qcrypto_secret_decrypt`: AES-256-CBC under the key secret, the last byte telling how many
/// padding bytes to drop.
fn decrypt(
    options: &SecretOptions,
    keyid: &str,
    input: &[u8],
    keys: &dyn Secrets,
) -> Result<Vec<u8>, SecretError> {
    let key = keys.secret(keyid)?;
    if key.len() != 32 {
        return Err(SecretError::KeyLength);
    }
    let iv = options.iv.as_deref().ok_or(SecretError::NoIv)?;
    let iv = base64_decode(iv.as_bytes())?;
    let iv: [u8; 16] = iv
        .as_slice()
        .try_into()
        .map_err(|_| SecretError::IvLength(iv.len()))?;
    let mut data = match options.format {
        SecretFormat::Base64 => base64_decode(input)?,
        SecretFormat::Raw => input.to_vec(),
    };
    if data.len() % 16 != 0 {
        return Err(SecretError::BlockLength(data.len()));
    }
    let key = UnboundCipherKey::new(&AES_256, &key).map_err(|_| SecretError::Decrypt)?;
    let key = DecryptingKey::cbc(key).map_err(|_| SecretError::Decrypt)?;
    let len = key
        .decrypt(&mut data, DecryptionContext::Iv128(FixedLength::from(iv)))
        .map_err(|_| SecretError::Decrypt)?
        .len();
    data.truncate(len);
    let pad = data.last().copied().unwrap_or(0);
    if pad > 16 || usize::from(pad) > data.len() {
        return Err(SecretError::Padding(pad));
    }
    data.truncate(data.len() - usize::from(pad));
    Ok(data)
}

/// QEMU's `qbase64_decode`: the alphabet, `=` and `\n` only, then GLib's `g_base64_decode`.
pub fn base64_decode(input: &[u8]) -> Result<Vec<u8>, SecretError> {
    if input.contains(&0) {
        return Err(SecretError::Base64Nul);
    }
    let rank = |c: u8| -> Option<u8> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => 0,
            _ => return None,
        })
    };
    if input.iter().any(|&c| c != b'\n' && rank(c).is_none()) {
        return Err(SecretError::Base64Invalid);
    }
    // GLib: groups of four characters give three bytes; the `=` among the last two
    // characters of the last whole group take one byte back each.
    let chars: Vec<u8> = input.iter().copied().filter(|&c| c != b'\n').collect();
    let mut out = Vec::with_capacity(chars.len() / 4 * 3);
    for group in chars.chunks_exact(4) {
        let v = group
            .iter()
            .fold(0u32, |acc, &c| (acc << 6) | u32::from(rank(c).unwrap_or(0)));
        out.extend_from_slice(&v.to_be_bytes()[1..]);
    }
    let whole = chars.len() / 4 * 4;
    if whole > 0 {
        let tail = &chars[whole - 2..whole];
        let pad = tail.iter().filter(|&&c| c == b'=').count();
        out.truncate(out.len() - pad);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, Vec<u8>>);

    impl Secrets for Map {
        fn secret(&self, id: &str) -> Result<Vec<u8>, SecretError> {
            self.0
                .get(id)
                .cloned()
                .ok_or_else(|| SecretError::NotFound(id.to_string()))
        }
    }

    fn load(o: SecretOptions) -> Result<Vec<u8>, String> {
        let keys = Map([("key", vec![7u8; 32]), ("short", vec![1u8; 5])].into());
        Secret::new(o, &keys)
            .map(|s| s.value().to_vec())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn data_file_and_base64() {
        assert_eq!(load(SecretOptions::data("hello")).unwrap(), b"hello");
        let b64 = |d: &str| SecretOptions {
            format: SecretFormat::Base64,
            ..SecretOptions::data(d)
        };
        assert_eq!(load(b64("aGVsbG8=")).unwrap(), b"hello");
        assert_eq!(load(b64("aGVs\nbG8=\n")).unwrap(), b"hello");
        assert_eq!(load(b64("aGVsbA==")).unwrap(), b"hell");
        // GLib drops an incomplete group.
        assert_eq!(load(b64("aGVsbG")).unwrap(), b"hel");
        assert_eq!(load(b64("x")).unwrap(), b"");
        assert_eq!(
            load(b64("a!b")).unwrap_err(),
            "Base64 data contains invalid characters"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, b"a\0b").unwrap();
        let file = |format| SecretOptions {
            file: Some(f.clone()),
            format,
            ..SecretOptions::default()
        };
        assert_eq!(load(file(SecretFormat::Raw)).unwrap(), b"a\0b");
        assert_eq!(
            load(file(SecretFormat::Base64)).unwrap_err(),
            "Base64 data contains embedded NUL characters"
        );
        assert_eq!(
            load(SecretOptions::default()).unwrap_err(),
            "Either 'file' or 'data' must be provided"
        );
        assert_eq!(
            load(SecretOptions {
                file: Some("/x".into()),
                ..SecretOptions::data("a")
            })
            .unwrap_err(),
            "'file' and 'data' are mutually exclusive"
        );
        assert_eq!(
            load(SecretOptions {
                file: Some("/nonexistent".into()),
                ..SecretOptions::default()
            })
            .unwrap_err(),
            "Unable to read /nonexistent: Failed to open file “/nonexistent”: No such file or directory"
        );
    }

    #[test]
    fn encrypted_with_another_secret() {
        // `printf 'top secret' | openssl enc -aes-256-cbc -K 07..07 -iv 00..00 -base64`
        let enc = |data: &str, keyid: &str, iv: Option<&str>| SecretOptions {
            format: SecretFormat::Base64,
            keyid: Some(keyid.into()),
            iv: iv.map(str::to_string),
            ..SecretOptions::data(data)
        };
        let iv = Some("AAAAAAAAAAAAAAAAAAAAAA==");
        assert_eq!(
            load(enc("OEi5nfSjxlhfY9l4IyUSfQ==", "key", iv)).unwrap(),
            b"top secret"
        );
        assert_eq!(
            load(enc("OEi5nfSjxlhfY9l4IyUSfQ==", "nope", iv)).unwrap_err(),
            "No secret with id 'nope'"
        );
        assert_eq!(
            load(enc("OEi5nfSjxlhfY9l4IyUSfQ==", "short", iv)).unwrap_err(),
            "Key should be 32 bytes in length"
        );
        assert_eq!(
            load(enc("OEi5nfSjxlhfY9l4IyUSfQ==", "key", None)).unwrap_err(),
            "IV is required to decrypt secret"
        );
        assert_eq!(
            load(enc("OEi5nfSjxlhfY9l4IyUSfQ==", "key", Some("AAAA"))).unwrap_err(),
            "IV should be 16 bytes in length not 3"
        );
        assert_eq!(
            load(enc("AAAA", "key", iv)).unwrap_err(),
            "Length 3 must be a multiple of block size 16"
        );
    }
}
