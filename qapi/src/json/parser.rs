//! The JSON parser proper: turns the tokens of one complete message (as cut by
//! [`crate::json::JsonStream`]) into a [`serde_json::Value`].
//!
//! It accepts what QEMU's `qobject/json-parser.c` accepts (RFC 8259 JSON, plus
//! single-quoted strings and the `\'` escape) and rejects what it rejects, with
//! the same messages: a client sees `JSON parse error, expected separator in
//! dict` from us as from QEMU.

use serde_json::{Map, Number, Value};

/// The kinds of token the lexer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    String,
    Integer,
    Float,
    Keyword,
}

/// One token: its kind and its bytes `buf[start..end]` in the message buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) kind: TokenKind,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Why a message's tokens are not a JSON value. The messages are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A value was expected (e.g. `[1,]`, `}` alone).
    #[error("JSON parse error, expecting value")]
    ExpectingValue,
    /// An object member without `:`.
    #[error("JSON parse error, missing : in object pair")]
    MissingColon,
    /// An object key that is not a string.
    #[error("JSON parse error, key is not a string in object")]
    KeyNotString,
    /// Two object members not separated by `,`.
    #[error("JSON parse error, expected separator in dict")]
    ExpectedSeparatorInDict,
    /// Two array elements not separated by `,`.
    #[error("JSON parse error, expected separator in list")]
    ExpectedSeparatorInList,
    /// A keyword other than `true`, `false`, `null`.
    #[error("JSON parse error, invalid keyword '{0}'")]
    InvalidKeyword(String),
    /// A backslash escape JSON does not define.
    #[error("JSON parse error, invalid escape sequence in string")]
    InvalidEscape,
    /// A `\u` escape that is not a valid Unicode character (the four
    /// characters after `\u` are shown as QEMU shows them).
    #[error("JSON parse error, \\u{0} is not a valid Unicode character")]
    InvalidUnicodeEscape(String),
    /// Raw bytes in a string that are not (modified) UTF-8 of a valid character.
    #[error("JSON parse error, invalid UTF-8 sequence in string")]
    InvalidUtf8,
    /// An object with the same key twice.
    #[error("JSON parse error, duplicate key")]
    DuplicateKey,
    /// The tokens ended inside a value.
    #[error("JSON parse error, premature EOI")]
    PrematureEoi,
    /// Tokens left after a complete value (cannot happen with the stream
    /// cutter's messages; kept so that the parser never panics).
    #[error("JSON parse error, expecting end of input")]
    TrailingTokens,
}

/// Parses the tokens of one message.
pub(crate) fn parse(tokens: &[Token], buf: &[u8]) -> Result<Value, ParseError> {
    let mut p = Parser {
        tokens,
        buf,
        pos: 0,
    };
    let v = p.value()?;
    if p.pos != tokens.len() {
        return Err(ParseError::TrailingTokens);
    }
    Ok(v)
}

struct Parser<'a> {
    tokens: &'a [Token],
    buf: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn pop(&mut self) -> Result<Token, ParseError> {
        let t = self.peek().ok_or(ParseError::PrematureEoi)?;
        self.pos += 1;
        Ok(t)
    }

    fn text(&self, t: Token) -> &[u8] {
        self.buf.get(t.start..t.end).unwrap_or_default()
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        let t = self.peek().ok_or(ParseError::PrematureEoi)?;
        match t.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::String => {
                self.pos += 1;
                parse_string(self.text(t)).map(Value::String)
            }
            TokenKind::Integer | TokenKind::Float => {
                self.pos += 1;
                Ok(Value::Number(parse_number(self.text(t), t.kind)))
            }
            TokenKind::Keyword => {
                self.pos += 1;
                match self.text(t) {
                    b"true" => Ok(Value::Bool(true)),
                    b"false" => Ok(Value::Bool(false)),
                    b"null" => Ok(Value::Null),
                    other => Err(ParseError::InvalidKeyword(
                        String::from_utf8_lossy(other).into_owned(),
                    )),
                }
            }
            TokenKind::RCurly | TokenKind::RSquare | TokenKind::Colon | TokenKind::Comma => {
                Err(ParseError::ExpectingValue)
            }
        }
    }

    fn object(&mut self) -> Result<Value, ParseError> {
        self.pop()?; // '{'
        let mut map = Map::new();
        if self.peek().ok_or(ParseError::PrematureEoi)?.kind == TokenKind::RCurly {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            let key = match self.value()? {
                Value::String(s) => s,
                _ => return Err(ParseError::KeyNotString),
            };
            if self.pop()?.kind != TokenKind::Colon {
                return Err(ParseError::MissingColon);
            }
            let value = self.value()?;
            if map.contains_key(&key) {
                return Err(ParseError::DuplicateKey);
            }
            map.insert(key, value);
            match self.pop()?.kind {
                TokenKind::RCurly => return Ok(Value::Object(map)),
                TokenKind::Comma => {}
                _ => return Err(ParseError::ExpectedSeparatorInDict),
            }
        }
    }

    fn array(&mut self) -> Result<Value, ParseError> {
        self.pop()?; // '['
        let mut list = Vec::new();
        if self.peek().ok_or(ParseError::PrematureEoi)?.kind == TokenKind::RSquare {
            self.pos += 1;
            return Ok(Value::Array(list));
        }
        loop {
            list.push(self.value()?);
            match self.pop()?.kind {
                TokenKind::RSquare => return Ok(Value::Array(list)),
                TokenKind::Comma => {}
                _ => return Err(ParseError::ExpectedSeparatorInList),
            }
        }
    }
}

/// QEMU's notion of a character it accepts: not a surrogate, not beyond
/// U+10FFFF, not a noncharacter.
fn is_valid_codepoint(cp: u32) -> bool {
    cp <= 0x10FFFF
        && !(0xD800..=0xDFFF).contains(&cp)
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
}

fn hex4(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < 4 {
        return None;
    }
    let mut v = 0u32;
    for &b in &bytes[..4] {
        v = v * 16 + (b as char).to_digit(16)?;
    }
    Some(v)
}

/// Decodes one (modified) UTF-8 sequence at the start of `bytes`; returns the
/// code point and its length. `C0 80` is accepted as U+0000, like QEMU does.
fn decode_utf8(bytes: &[u8]) -> Option<(u32, usize)> {
    let lead = *bytes.first()?;
    let (len, init, min) = match lead {
        0x00..=0x7F => return Some((u32::from(lead), 1)),
        0xC0..=0xDF => (2, u32::from(lead & 0x1F), 0x80),
        0xE0..=0xEF => (3, u32::from(lead & 0x0F), 0x800),
        0xF0..=0xF7 => (4, u32::from(lead & 0x07), 0x10000),
        _ => return None,
    };
    let cont = bytes.get(1..len)?;
    let mut cp = init;
    for &b in cont {
        if b & 0xC0 != 0x80 {
            return None;
        }
        cp = (cp << 6) | u32::from(b & 0x3F);
    }
    if cp < min && !(len == 2 && cp == 0) {
        return None;
    }
    is_valid_codepoint(cp).then_some((cp, len))
}

/// Decodes bytes as QEMU's `mod_utf8_codepoint` loop does when it prints
/// them: the lead byte gives the length, continuation bytes are taken while
/// they come, and each invalid sequence (as far as it got) becomes one
/// U+FFFD.
pub(crate) fn qemu_lossy(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x80 {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        if b >= 0xFE || b & 0x40 == 0 {
            out.push('\u{FFFD}');
            i += 1;
            continue;
        }
        let len = b.leading_ones() as usize; // 2..=6
        let mut cp = u32::from(b) & (0x7F >> len);
        let mut j = 1;
        let mut complete = true;
        while j < len {
            match bytes.get(i + j) {
                Some(&c) if c & 0xC0 == 0x80 => {
                    cp = (cp << 6) | u32::from(c & 0x3F);
                    j += 1;
                }
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        i += j;
        const MIN: [u32; 5] = [0x80, 0x800, 0x10000, 0x20_0000, 0x400_0000];
        let overlong = cp < MIN[len - 2] && !(cp == 0 && len == 2);
        let c = if complete && is_valid_codepoint(cp) && !overlong {
            char::from_u32(cp)
        } else {
            None
        };
        out.push(c.unwrap_or('\u{FFFD}'));
    }
    out
}

/// Unescapes a string token, quotes included (`"..."` or `'...'`).
fn parse_string(tok: &[u8]) -> Result<String, ParseError> {
    // The lexer guarantees an opening and a closing quote.
    let inner = tok
        .get(1..tok.len().saturating_sub(1))
        .ok_or(ParseError::PrematureEoi)?;
    let mut out = String::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        if b != b'\\' {
            let (cp, len) = decode_utf8(&inner[i..]).ok_or(ParseError::InvalidUtf8)?;
            out.push(char::from_u32(cp).ok_or(ParseError::InvalidUtf8)?);
            i += len;
            continue;
        }
        let esc = inner.get(i + 1).copied().ok_or(ParseError::InvalidEscape)?;
        let simple = match esc {
            b'"' => Some('"'),
            b'\'' => Some('\''),
            b'\\' => Some('\\'),
            b'/' => Some('/'),
            b'b' => Some('\u{8}'),
            b'f' => Some('\u{c}'),
            b'n' => Some('\n'),
            b'r' => Some('\r'),
            b't' => Some('\t'),
            b'u' => None,
            _ => return Err(ParseError::InvalidEscape),
        };
        if let Some(c) = simple {
            out.push(c);
            i += 2;
            continue;
        }
        // `\uXXXX`, possibly a surrogate pair `\uD8xx\uDCxx`. QEMU shows the
        // four bytes after the first `\u`, whatever they are (the closing
        // quote included), in its message.
        let shown_end = (i + 7).min(tok.len());
        let shown =
            String::from_utf8_lossy(tok.get(i + 3..shown_end).unwrap_or_default()).into_owned();
        let bad = || ParseError::InvalidUnicodeEscape(shown.clone());
        let first = hex4(&inner[i + 2..]).ok_or_else(bad)?;
        let (cp, len) = if (0xD800..=0xDBFF).contains(&first) {
            let rest = &inner[i + 6..];
            if rest.len() < 6 || rest[0] != b'\\' || rest[1] != b'u' {
                return Err(bad());
            }
            let second = hex4(&rest[2..]).ok_or_else(bad)?;
            if !(0xDC00..=0xDFFF).contains(&second) {
                return Err(bad());
            }
            (0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00), 12)
        } else {
            (first, 6)
        };
        if !is_valid_codepoint(cp) {
            return Err(bad());
        }
        out.push(char::from_u32(cp).ok_or_else(bad)?);
        i += len;
    }
    Ok(out)
}

/// Parses a number token as QEMU does: an integer token is an `i64` if it
/// fits, else a `u64`, else a double; a float token is a double.
///
/// A number beyond the range of a double is infinity for QEMU (`strtod`),
/// which JSON cannot carry; it becomes the largest finite double of its sign
/// (QEMU would print it back as the invalid JSON `inf`).
fn parse_number(tok: &[u8], kind: TokenKind) -> Number {
    // The lexer only lets ASCII digits, signs, '.', 'e' and 'E' through.
    let s = std::str::from_utf8(tok).unwrap_or("0");
    if kind == TokenKind::Integer {
        if let Ok(v) = s.parse::<i64>() {
            return Number::from(v);
        }
        if let Ok(v) = s.parse::<u64>() {
            return Number::from(v);
        }
    }
    let v = s.parse::<f64>().unwrap_or(0.0);
    let v = if v.is_finite() {
        v
    } else if v.is_sign_negative() {
        f64::MIN
    } else {
        f64::MAX
    };
    Number::from_f64(v).unwrap_or_else(|| Number::from(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_unescape_like_qemu() {
        assert_eq!(parse_string(br#""a\"b\\c\/d""#).unwrap(), "a\"b\\c/d");
        assert_eq!(parse_string(br#"'x"y\''"#).unwrap(), "x\"y'");
        assert_eq!(
            parse_string(br#""\b\f\n\r\t""#).unwrap(),
            "\u{8}\u{c}\n\r\t"
        );
        assert_eq!(parse_string(br#""\u00e9\ud83d\ude00""#).unwrap(), "é😀");
        assert_eq!(parse_string(b"\"\xc3\xa9\"").unwrap(), "é");
        assert_eq!(parse_string(b"\"\xc0\x80\"").unwrap(), "\0");
        assert_eq!(parse_string(br#""\u0000""#).unwrap(), "\0");
    }

    #[test]
    fn bad_strings_get_qemu_messages() {
        assert_eq!(parse_string(br#""a\qb""#), Err(ParseError::InvalidEscape));
        assert_eq!(
            parse_string(br#""\ud83d""#).unwrap_err().to_string(),
            "JSON parse error, \\ud83d is not a valid Unicode character"
        );
        assert_eq!(
            parse_string(br#""\ud83d\u0041""#).unwrap_err().to_string(),
            "JSON parse error, \\ud83d is not a valid Unicode character"
        );
        assert_eq!(
            parse_string(br#""\u12g4""#).unwrap_err().to_string(),
            "JSON parse error, \\u12g4 is not a valid Unicode character"
        );
        assert_eq!(
            parse_string(br#""\u00""#).unwrap_err().to_string(),
            "JSON parse error, \\u00\" is not a valid Unicode character"
        );
        assert_eq!(
            parse_string(br#""\uFFFE""#).unwrap_err().to_string(),
            "JSON parse error, \\uFFFE is not a valid Unicode character"
        );
        assert_eq!(
            parse_string(br#""\uDC00""#).unwrap_err().to_string(),
            "JSON parse error, \\uDC00 is not a valid Unicode character"
        );
        for bad in [
            &b"\"\xc3\""[..],
            b"\"\xed\xa0\x80\"",
            b"\"\xef\xbf\xbf\"",
            b"\"\xc1\xbf\"",
            b"\"\xf4\x90\x80\x80\"",
        ] {
            assert_eq!(parse_string(bad), Err(ParseError::InvalidUtf8), "{bad:?}");
        }
    }

    #[test]
    fn lossy_decoding_like_qemu() {
        assert_eq!(qemu_lossy(b"a\xc3\xa9"), "aé");
        // One replacement per sequence as far as it got, like QEMU.
        assert_eq!(qemu_lossy(b"\"\xf4\x90\x04"), "\"\u{FFFD}\u{4}");
        assert_eq!(qemu_lossy(b"\xff\x80\xc3"), "\u{FFFD}\u{FFFD}\u{FFFD}");
        assert_eq!(qemu_lossy(b"\xc0\x80\xc1\xbf"), "\u{0}\u{FFFD}");
        assert_eq!(qemu_lossy(b"\xef\xbf\xbf\xed\xa0\x80"), "\u{FFFD}\u{FFFD}");
        assert_eq!(qemu_lossy(b"\xfd\xbf\xbf\xbf\xbf\xbf"), "\u{FFFD}");
    }

    #[test]
    fn numbers_pick_qemu_types() {
        let n = |s: &str, k| parse_number(s.as_bytes(), k);
        assert_eq!(n("-0", TokenKind::Integer), Number::from(0));
        assert_eq!(
            n("18446744073709551615", TokenKind::Integer),
            Number::from(u64::MAX)
        );
        assert!(n("18446744073709551616", TokenKind::Integer).is_f64());
        assert!(n("-9223372036854775809", TokenKind::Integer).is_f64());
        assert_eq!(n("1.5e3", TokenKind::Float).as_f64(), Some(1500.0));
        assert_eq!(n("1e400", TokenKind::Float).as_f64(), Some(f64::MAX));
        assert_eq!(n("-1e400", TokenKind::Float).as_f64(), Some(f64::MIN));
        let huge = "9".repeat(400);
        assert_eq!(n(&huge, TokenKind::Integer).as_f64(), Some(f64::MAX));
    }
}
