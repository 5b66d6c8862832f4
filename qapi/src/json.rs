//! QEMU's JSON dialect: a stream of bytes in, JSON messages (or errors) out.
//!
//! [`JsonStream`] is QMP's input (any number of messages, fed as bytes arrive);
//! [`from_str`] reads one value from a complete text, as QEMU's `qobject_from_json()`
//! does for a command-line option such as `--blockdev '{"driver": ...}'`. Both go
//! through the same lexer and parser ([`parser`]), so both accept what QEMU accepts
//! (RFC 8259 plus single-quoted strings and the `\'` escape) with QEMU's messages.
//!
//! QMP input is a JSON *stream*, not lines: several objects may share a line
//! and one object may span lines. Like QEMU (`qobject/json-lexer.c`,
//! `json-streamer.c`) we cut it into messages with a lexer that knows
//! strings and escapes, and count braces and brackets: a message ends when
//! both counts are back to zero (or one goes negative, which the parser then
//! reports). No I/O happens here; the caller feeds whatever it has read.
//!
//! Lexer states (every token ends back in `Start`):
//!
//! ```text
//!  Start --'"'--> DqString --'\'--> DqEscape --any--> DqString --'"'--> token
//!  Start --"'"--> SqString (same, with ' as the delimiter)
//!  Start --'-'--> Sign --digit--> Zero/Nonzero --'.'--> Mantissa --digit--> MantissaDigits
//!                                 Nonzero/MantissaDigits --e/E--> ExpE --+/- --> ExpSign --digit--> ExpDigits
//!  Start --a..z--> Keyword
//!  any state --byte it cannot take--> error token, then Recovery
//!  Recovery --control char except TAB, 0xFE, 0xFF, or one of []{}:,--> Start (byte not consumed)
//! ```
//!
//! After a lexical error QEMU (and we) skip input until a byte at which a
//! message plausibly starts, so one bad byte produces one error, not one per
//! following byte. qmp-spec.rst, "Forcing the JSON parser into known-good
//! state": "the client should provoke a lexical error. The cleanest way to
//! do that is sending an ASCII control character other than `\t`
//! (horizontal tab), `\r` (carriage return), or `\n` (new line)" (or, for
//! older servers, 0xFF): both are lexical errors here and end recovery.
//!
//! Memory is bounded per monitor: the bytes of one pending message, its token
//! count and its nesting depth are limited ([`StreamLimits`]), and a message
//! over a limit is dropped with an error before anything more is buffered.

use serde_json::Value;

pub mod parser;

pub use parser::ParseError;
use parser::{Token, TokenKind};

/// Limits on one pending message.
///
/// QEMU's are 64 MiB of token bytes, 2 Mi tokens and 1024 levels of nesting;
/// our default byte and token limits are smaller (16 MiB, 1 Mi tokens), as no
/// QMP command needs more and the parsed form of a message costs several times
/// its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// The most bytes of tokens one message may have (whitespace between
    /// tokens is not counted, as in QEMU).
    pub max_message_bytes: usize,
    /// The most tokens one message may have.
    pub max_tokens: usize,
    /// The deepest nesting of objects and arrays.
    pub max_nesting: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            max_tokens: 1 << 20,
            max_nesting: 1024,
        }
    }
}

/// Why a message was rejected. Each variant's text is QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A byte that cannot continue the current token (the token so far,
    /// with that byte, is shown; invalid UTF-8 is shown as U+FFFD).
    #[error("JSON parse error, stray '{0}'")]
    Stray(String),
    /// The message's bytes exceed [`StreamLimits::max_message_bytes`].
    #[error("JSON token size limit exceeded")]
    TooLarge,
    /// The message's tokens exceed [`StreamLimits::max_tokens`].
    #[error("JSON token count limit exceeded")]
    TooManyTokens,
    /// The message nests deeper than [`StreamLimits::max_nesting`].
    #[error("JSON nesting depth limit exceeded")]
    TooDeep,
    /// The tokens are not a JSON value.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Sign,
    Zero,
    Nonzero,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
    Recovery,
}

/// What one step of the lexer did with the byte.
enum Step {
    Consumed,
    /// The byte ended a token without being part of it: look at it again.
    Again,
}

/// Cuts a byte stream into JSON messages.
#[derive(Debug)]
pub struct JsonStream {
    limits: StreamLimits,
    state: State,
    /// The bytes of the pending message's tokens (whitespace dropped).
    buf: Vec<u8>,
    /// Where the token being lexed starts in `buf`.
    token_start: usize,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
}

impl Default for JsonStream {
    fn default() -> Self {
        Self::new(StreamLimits::default())
    }
}

impl JsonStream {
    /// A reader with the given limits.
    pub fn new(limits: StreamLimits) -> Self {
        Self {
            limits,
            state: State::Start,
            buf: Vec::new(),
            token_start: 0,
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
        }
    }

    /// Bytes currently buffered for the pending message (never more than
    /// the limit).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds bytes; calls `out` once per complete message or error, in order.
    pub fn feed(&mut self, input: &[u8], mut out: impl FnMut(Result<Value, StreamError>)) {
        for &b in input {
            while let Step::Again = self.step(b, &mut out) {}
        }
    }

    /// Feeds bytes and collects the results (convenience for tests and tools).
    pub fn feed_collect(&mut self, input: &[u8]) -> Vec<Result<Value, StreamError>> {
        let mut v = Vec::new();
        self.feed(input, |m| v.push(m));
        v
    }

    /// Ends the input (QEMU's `json_message_parser_flush()`): the token being
    /// lexed ends as if a NUL byte followed it, and tokens of an unfinished
    /// message are parsed (`JSON parse error, premature EOI`). The stream is
    /// then ready for new input.
    pub fn flush(&mut self, mut out: impl FnMut(Result<Value, StreamError>)) {
        if !matches!(self.state, State::Start | State::Recovery) {
            while let Step::Again = self.step(0, &mut out) {
                if self.state == State::Start {
                    break;
                }
            }
        }
        self.state = State::Start;
        if !self.tokens.is_empty() {
            let result = parser::parse(&self.tokens, &self.buf).map_err(StreamError::from);
            self.reset_message();
            out(result);
        }
    }

    fn reset_message(&mut self) {
        self.buf.clear();
        self.tokens.clear();
        self.token_start = 0;
        self.braces = 0;
        self.brackets = 0;
    }

    /// Appends a byte of the current token, within the size limit.
    fn push(
        &mut self,
        b: u8,
        next: State,
        out: &mut impl FnMut(Result<Value, StreamError>),
    ) -> Step {
        if self.buf.len() >= self.limits.max_message_bytes {
            self.reset_message();
            self.state = State::Recovery;
            out(Err(StreamError::TooLarge));
            return Step::Consumed;
        }
        self.buf.push(b);
        self.state = next;
        Step::Consumed
    }

    /// The current token plus `b` is not JSON: report it and recover.
    fn error(&mut self, b: u8, out: &mut impl FnMut(Result<Value, StreamError>)) -> Step {
        let mut text = self
            .buf
            .get(self.token_start..)
            .unwrap_or_default()
            .to_vec();
        text.push(b);
        // QEMU formats the token as a C string: a NUL byte ends it.
        if let Some(nul) = text.iter().position(|&c| c == 0) {
            text.truncate(nul);
        }
        self.reset_message();
        self.state = State::Recovery;
        out(Err(StreamError::Stray(parser::qemu_lossy(&text))));
        Step::Consumed
    }

    /// Starts a token with byte `b`.
    fn begin(
        &mut self,
        b: u8,
        next: State,
        out: &mut impl FnMut(Result<Value, StreamError>),
    ) -> Step {
        self.token_start = self.buf.len();
        self.push(b, next, out)
    }

    /// A single-byte structural token.
    fn structural(
        &mut self,
        b: u8,
        kind: TokenKind,
        out: &mut impl FnMut(Result<Value, StreamError>),
    ) -> Step {
        if let Step::Consumed = self.begin(b, State::Start, out) {
            if self.state == State::Start {
                self.finish(kind, out);
            }
        }
        Step::Consumed
    }

    /// The current token is complete: hand it to the message cutter.
    fn finish(&mut self, kind: TokenKind, out: &mut impl FnMut(Result<Value, StreamError>)) {
        self.state = State::Start;
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            _ => {}
        }
        if self.tokens.len() >= self.limits.max_tokens {
            self.reset_message();
            out(Err(StreamError::TooManyTokens));
            return;
        }
        if self.braces + self.brackets > self.limits.max_nesting as i64 {
            self.reset_message();
            out(Err(StreamError::TooDeep));
            return;
        }
        self.tokens.push(Token {
            kind,
            start: self.token_start,
            end: self.buf.len(),
        });
        self.token_start = self.buf.len();
        let open = self.braces > 0 || self.brackets > 0;
        if open && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let result = parser::parse(&self.tokens, &self.buf).map_err(StreamError::from);
        self.reset_message();
        out(result);
    }

    fn step(&mut self, b: u8, out: &mut impl FnMut(Result<Value, StreamError>)) -> Step {
        use State::*;
        let digit = b.is_ascii_digit();
        match self.state {
            Start => match b {
                b' ' | b'\t' | b'\r' | b'\n' => Step::Consumed,
                b'{' => self.structural(b, TokenKind::LCurly, out),
                b'}' => self.structural(b, TokenKind::RCurly, out),
                b'[' => self.structural(b, TokenKind::LSquare, out),
                b']' => self.structural(b, TokenKind::RSquare, out),
                b':' => self.structural(b, TokenKind::Colon, out),
                b',' => self.structural(b, TokenKind::Comma, out),
                b'"' => self.begin(b, DqString, out),
                b'\'' => self.begin(b, SqString, out),
                b'0' => self.begin(b, Zero, out),
                b'1'..=b'9' => self.begin(b, Nonzero, out),
                b'-' => self.begin(b, Sign, out),
                b'a'..=b'z' => self.begin(b, Keyword, out),
                _ => {
                    self.token_start = self.buf.len();
                    self.error(b, out)
                }
            },
            DqString | SqString => {
                let (quote, escape) = if self.state == DqString {
                    (b'"', DqEscape)
                } else {
                    (b'\'', SqEscape)
                };
                match b {
                    b'\\' => self.push(b, escape, out),
                    _ if b == quote => {
                        if let Step::Consumed = self.push(b, Start, out) {
                            if self.state == Start {
                                self.finish(TokenKind::String, out);
                            }
                        }
                        Step::Consumed
                    }
                    0x20..=0xFD => self.push(b, self.state, out),
                    _ => self.error(b, out),
                }
            }
            DqEscape | SqEscape => match b {
                0x20..=0xFD => {
                    let back = if self.state == DqEscape {
                        DqString
                    } else {
                        SqString
                    };
                    self.push(b, back, out)
                }
                _ => self.error(b, out),
            },
            Sign => match b {
                b'0' => self.push(b, Zero, out),
                b'1'..=b'9' => self.push(b, Nonzero, out),
                _ => self.error(b, out),
            },
            Zero => match b {
                b'.' => self.push(b, Mantissa, out),
                _ if digit => self.error(b, out),
                _ => {
                    self.finish(TokenKind::Integer, out);
                    Step::Again
                }
            },
            Nonzero => match b {
                b'.' => self.push(b, Mantissa, out),
                b'e' | b'E' => self.push(b, ExpE, out),
                _ if digit => self.push(b, Nonzero, out),
                _ => {
                    self.finish(TokenKind::Integer, out);
                    Step::Again
                }
            },
            Mantissa => match b {
                _ if digit => self.push(b, MantissaDigits, out),
                _ => self.error(b, out),
            },
            MantissaDigits => match b {
                b'e' | b'E' => self.push(b, ExpE, out),
                _ if digit => self.push(b, MantissaDigits, out),
                _ => {
                    self.finish(TokenKind::Float, out);
                    Step::Again
                }
            },
            ExpE => match b {
                b'+' | b'-' => self.push(b, ExpSign, out),
                _ if digit => self.push(b, ExpDigits, out),
                _ => self.error(b, out),
            },
            ExpSign => match b {
                _ if digit => self.push(b, ExpDigits, out),
                _ => self.error(b, out),
            },
            ExpDigits => match b {
                _ if digit => self.push(b, ExpDigits, out),
                _ => {
                    self.finish(TokenKind::Float, out);
                    Step::Again
                }
            },
            Keyword => match b {
                b'a'..=b'z' => self.push(b, Keyword, out),
                _ => {
                    self.finish(TokenKind::Keyword, out);
                    Step::Again
                }
            },
            Recovery => match b {
                b'\t' => Step::Consumed,
                0x00..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}' | b':' | b',' => {
                    self.state = Start;
                    Step::Again
                }
                _ => Step::Consumed,
            },
        }
    }
}

/// Why a text is not exactly one JSON value ([`from_str`]). Each text is QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The first value is malformed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Something follows the first value.
    #[error("Expecting at most one JSON value")]
    Trailing,
    /// The text holds no value at all (only white space).
    #[error("Expecting a JSON value")]
    Empty,
}

/// Reads the one JSON value `text` holds, in QEMU's dialect and with QEMU's
/// messages (`qobject_from_json()`): the first message decides, and anything
/// after a complete value is [`JsonError::Trailing`].
///
/// ```
/// let v = qsd_qapi::json::from_str("{'driver': 'null-co', \"size\": 1}").unwrap();
/// assert_eq!(v, serde_json::json!({"driver": "null-co", "size": 1}));
/// let e = qsd_qapi::json::from_str("{\"a\": 1} x").unwrap_err();
/// assert_eq!(e.to_string(), "Expecting at most one JSON value");
/// ```
pub fn from_str(text: &str) -> Result<Value, JsonError> {
    let mut stream = JsonStream::default();
    let mut result: Option<Result<Value, JsonError>> = None;
    let mut consume = |m: Result<Value, StreamError>| match result {
        None => result = Some(m.map_err(JsonError::from)),
        Some(Ok(_)) => result = Some(Err(JsonError::Trailing)),
        Some(Err(_)) => {}
    };
    stream.feed(text.as_bytes(), &mut consume);
    stream.flush(&mut consume);
    result.unwrap_or(Err(JsonError::Empty))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msgs(input: &[u8]) -> Vec<Result<Value, String>> {
        JsonStream::default()
            .feed_collect(input)
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn several_objects_on_one_line_and_one_over_lines() {
        assert_eq!(
            msgs(b"{\"a\":1}{\"b\":[2]}\n{\n\"c\"\n:\n3}\n"),
            vec![
                Ok(json!({"a": 1})),
                Ok(json!({"b": [2]})),
                Ok(json!({"c": 3}))
            ]
        );
    }

    #[test]
    fn split_anywhere_gives_the_same_messages() {
        let input =
            br#"{"execute": "x", "arguments": {"s": "a}b]\"c", "n": -1.5e3, "k": [true, null]}}"#;
        let whole = msgs(input);
        for cut in 0..input.len() {
            let mut s = JsonStream::default();
            let mut got = s.feed_collect(&input[..cut]);
            got.extend(s.feed_collect(&input[cut..]));
            let got: Vec<_> = got
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect();
            assert_eq!(got, whole, "cut at {cut}");
        }
        assert_eq!(whole.len(), 1);
        assert!(whole[0].is_ok());
    }

    #[test]
    fn scalars_are_messages_too() {
        assert_eq!(
            msgs(b"1 \"a\" true\n"),
            vec![Ok(json!(1)), Ok(json!("a")), Ok(json!(true))]
        );
        // A number or keyword ends only at the byte after it.
        assert_eq!(msgs(b"123"), vec![]);
    }

    #[test]
    fn errors_have_qemu_texts() {
        let e = |s: &[u8]| {
            msgs(s)
                .into_iter()
                .map(|r| r.unwrap_err())
                .collect::<Vec<_>>()
        };
        assert_eq!(e(b"}\n"), vec!["JSON parse error, expecting value"]);
        assert_eq!(
            e(b"{\"a\" 1}"),
            vec!["JSON parse error, missing : in object pair"]
        );
        assert_eq!(
            e(b"{1:2}"),
            vec!["JSON parse error, key is not a string in object"]
        );
        assert_eq!(
            e(b"{\"a\":1 \"b\":2}"),
            vec!["JSON parse error, expected separator in dict"]
        );
        assert_eq!(
            e(b"[1 2]"),
            vec!["JSON parse error, expected separator in list"]
        );
        assert_eq!(e(b"[1,]"), vec!["JSON parse error, expecting value"]);
        assert_eq!(e(b"{\"a\":1,}"), vec!["JSON parse error, expecting value"]);
        assert_eq!(e(b"xyz\n"), vec!["JSON parse error, invalid keyword 'xyz'"]);
        assert_eq!(e(b"@\n"), vec!["JSON parse error, stray '@'"]);
        assert_eq!(e(b"01\n"), vec!["JSON parse error, stray '01'"]);
        assert_eq!(e(b"1.\n"), vec!["JSON parse error, stray '1.\n'"]);
        assert_eq!(e(b"-\n"), vec!["JSON parse error, stray '-\n'"]);
        assert_eq!(
            e(b"{\"a\":1,\"a\":2}"),
            vec!["JSON parse error, duplicate key"]
        );
        // A control character in a string; recovery then skips to the '}'.
        assert_eq!(
            e(b"{\"id\":\"\t\"}\n"),
            vec![
                "JSON parse error, stray '\"\t'",
                "JSON parse error, expecting value"
            ]
        );
        // '%' (QEMU's interpolation) is not accepted on the wire.
        assert_eq!(
            e(b"{\"id\": %d}\n"),
            vec![
                "JSON parse error, stray '%'",
                "JSON parse error, expecting value"
            ]
        );
    }

    #[test]
    fn recovery_skips_to_a_resync_byte() {
        // As QSD: after "1.\n" fails, "-\n" is skipped silently (the '-' in
        // recovery, the '\n' resyncs), and the next object is read.
        let mut s = JsonStream::default();
        assert_eq!(s.feed_collect(b"1.\n").len(), 1);
        assert!(s.feed_collect(b"-\n").is_empty());
        let r = s.feed_collect(b"{\"a\":1}");
        assert_eq!(r, vec![Ok(json!({"a": 1}))]);
        let mut s = JsonStream::default();
        let r: Vec<_> = s
            .feed_collect(b"\xff{\"a\":1}")
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(
            r,
            vec![
                Err("JSON parse error, stray '\u{FFFD}'".to_string()),
                Ok(json!({"a": 1}))
            ]
        );
    }

    #[test]
    fn nesting_limit() {
        let mut deep = vec![b'['; 1025];
        deep.push(b'\n');
        assert_eq!(
            msgs(&deep),
            vec![Err("JSON nesting depth limit exceeded".to_string())]
        );
        let mut ok = vec![b'['; 1024];
        ok.extend(vec![b']'; 1024]);
        let r = msgs(&ok);
        assert_eq!(r.len(), 1);
        assert!(r[0].is_ok());
    }

    #[test]
    fn size_and_token_limits_bound_the_buffer() {
        let limits = StreamLimits {
            max_message_bytes: 100,
            max_tokens: 10,
            max_nesting: 1024,
        };
        let mut s = JsonStream::new(limits);
        let mut long = b"{\"a\": \"".to_vec();
        long.extend(vec![b'x'; 1000]);
        long.extend(b"\"}\n{\"b\": 1}");
        let r: Vec<_> = s
            .feed_collect(&long)
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(
            r,
            vec![
                Err("JSON token size limit exceeded".to_string()),
                // Recovery resyncs at the '}' that closed the dropped message.
                Err("JSON parse error, expecting value".to_string()),
                Ok(json!({"b": 1}))
            ]
        );
        assert!(s.buffered() <= 100);
        // Over the token limit the message is dropped at once; what follows
        // is read afresh (here: scalars and a stray ']', as QEMU would).
        let r = s.feed_collect(b"[1,2,3,4,5,6,7,8,9]");
        assert!(s.buffered() < 10);
        assert_eq!(
            r[0].as_ref().unwrap_err().to_string(),
            "JSON token count limit exceeded"
        );
    }
}
