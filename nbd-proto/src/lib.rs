//! The NBD wire format: magic numbers, code sets, header layouts and option payloads.
//!
//! Everything here is pure: decoders take byte slices and never panic (every length is
//! checked before it is used, trailing bytes are rejected), encoders append to a `Vec<u8>`
//! and cannot fail. Code sets stay open: an unknown option, command or info type is a value
//! of its newtype, not a decoding error, so that the server can answer it as the spec says
//! (`NBD_REP_ERR_UNSUP`, `NBD_EINVAL`) and keep the connection.
//!
//! The reference is `doc/proto.md` of the NetworkBlockDevice/nbd repository, including the
//! extended-headers extension.
//!
//! ```
//! use nbd_proto::{cmd_flags, Command, RequestHeader, COMPACT_REQUEST_SIZE};
//!
//! // A client encodes a write request with FUA...
//! let req = RequestHeader {
//!     flags: cmd_flags::FUA,
//!     command: Command::WRITE,
//!     cookie: 7,
//!     offset: 4096,
//!     length: 512,
//! };
//! let mut wire = Vec::new();
//! req.encode(false, &mut wire);
//! assert_eq!(wire.len(), COMPACT_REQUEST_SIZE);
//! // ...and a server decodes it; a short or trailing buffer is an error, never a panic.
//! assert_eq!(RequestHeader::decode(&wire, false), Ok(req));
//! assert!(RequestHeader::decode(&wire[..20], false).is_err());
//! ```

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// The longest string (export name, description, query, error message) the spec allows.
pub const MAX_STRING_SIZE: usize = 4096;
/// The largest payload this server accepts or sends in one request (QEMU's
/// `NBD_MAX_BUFFER_SIZE`), advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Size of the header of a compact request.
pub const COMPACT_REQUEST_SIZE: usize = 28;
/// Size of the header of an extended request.
pub const EXTENDED_REQUEST_SIZE: usize = 32;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits), the client's answer to the handshake flags.
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits), sent with the export size.
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE`.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`.
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Command flags (16 bits) of a request.
pub mod cmd_flags {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// `NBD_REPLY_FLAG_DONE`: the last chunk of a structured or extended reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Block status flags: `base:allocation`'s, and `qemu:dirty-bitmap:`'s.
pub mod state {
    /// `NBD_STATE_HOLE` (`base:allocation`).
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO` (`base:allocation`).
    pub const ZERO: u32 = 1 << 1;
    /// `NBD_STATE_DIRTY` (`qemu:dirty-bitmap:NAME`, QEMU's `docs/interop/nbd.rst`).
    pub const DIRTY: u32 = 1 << 0;
}

macro_rules! open_code {
    ($(#[$meta:meta])* $name:ident($repr:ty) { $($(#[$cmeta:meta])* $konst:ident = $value:expr => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub $repr);

        impl $name {
            $($(#[$cmeta])* pub const $konst: $name = $name($value);)*

            /// The spec's name of the code, if it is one this crate knows.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $($name::$konst => Some($text),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => write!(f, "{name}"),
                    None => write!(f, "{}({})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

open_code! {
    /// An option sent during the handshake (`NBD_OPT_*`).
    OptionCode(u32) {
        /// `NBD_OPT_EXPORT_NAME`.
        EXPORT_NAME = 1 => "NBD_OPT_EXPORT_NAME",
        /// `NBD_OPT_ABORT`.
        ABORT = 2 => "NBD_OPT_ABORT",
        /// `NBD_OPT_LIST`.
        LIST = 3 => "NBD_OPT_LIST",
        /// `NBD_OPT_STARTTLS`.
        STARTTLS = 5 => "NBD_OPT_STARTTLS",
        /// `NBD_OPT_INFO`.
        INFO = 6 => "NBD_OPT_INFO",
        /// `NBD_OPT_GO`.
        GO = 7 => "NBD_OPT_GO",
        /// `NBD_OPT_STRUCTURED_REPLY`.
        STRUCTURED_REPLY = 8 => "NBD_OPT_STRUCTURED_REPLY",
        /// `NBD_OPT_LIST_META_CONTEXT`.
        LIST_META_CONTEXT = 9 => "NBD_OPT_LIST_META_CONTEXT",
        /// `NBD_OPT_SET_META_CONTEXT`.
        SET_META_CONTEXT = 10 => "NBD_OPT_SET_META_CONTEXT",
        /// `NBD_OPT_EXTENDED_HEADERS`.
        EXTENDED_HEADERS = 11 => "NBD_OPT_EXTENDED_HEADERS",
    }
}

open_code! {
    /// The type of an option reply (`NBD_REP_*`); errors have bit 31 set.
    ReplyType(u32) {
        /// `NBD_REP_ACK`.
        ACK = 1 => "NBD_REP_ACK",
        /// `NBD_REP_SERVER`.
        SERVER = 2 => "NBD_REP_SERVER",
        /// `NBD_REP_INFO`.
        INFO = 3 => "NBD_REP_INFO",
        /// `NBD_REP_META_CONTEXT`.
        META_CONTEXT = 4 => "NBD_REP_META_CONTEXT",
        /// `NBD_REP_ERR_UNSUP`.
        ERR_UNSUP = (1 << 31) + 1 => "NBD_REP_ERR_UNSUP",
        /// `NBD_REP_ERR_POLICY`.
        ERR_POLICY = (1 << 31) + 2 => "NBD_REP_ERR_POLICY",
        /// `NBD_REP_ERR_INVALID`.
        ERR_INVALID = (1 << 31) + 3 => "NBD_REP_ERR_INVALID",
        /// `NBD_REP_ERR_PLATFORM`.
        ERR_PLATFORM = (1 << 31) + 4 => "NBD_REP_ERR_PLATFORM",
        /// `NBD_REP_ERR_TLS_REQD`.
        ERR_TLS_REQD = (1 << 31) + 5 => "NBD_REP_ERR_TLS_REQD",
        /// `NBD_REP_ERR_UNKNOWN`.
        ERR_UNKNOWN = (1 << 31) + 6 => "NBD_REP_ERR_UNKNOWN",
        /// `NBD_REP_ERR_SHUTDOWN`.
        ERR_SHUTDOWN = (1 << 31) + 7 => "NBD_REP_ERR_SHUTDOWN",
        /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
        ERR_BLOCK_SIZE_REQD = (1 << 31) + 8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        /// `NBD_REP_ERR_TOO_BIG`.
        ERR_TOO_BIG = (1 << 31) + 9 => "NBD_REP_ERR_TOO_BIG",
        /// `NBD_REP_ERR_EXT_HEADER_REQD`.
        ERR_EXT_HEADER_REQD = (1 << 31) + 10 => "NBD_REP_ERR_EXT_HEADER_REQD",
    }
}

open_code! {
    /// An information type of `NBD_OPT_INFO`/`NBD_OPT_GO` (`NBD_INFO_*`).
    InfoType(u16) {
        /// `NBD_INFO_EXPORT`.
        EXPORT = 0 => "NBD_INFO_EXPORT",
        /// `NBD_INFO_NAME`.
        NAME = 1 => "NBD_INFO_NAME",
        /// `NBD_INFO_DESCRIPTION`.
        DESCRIPTION = 2 => "NBD_INFO_DESCRIPTION",
        /// `NBD_INFO_BLOCK_SIZE`.
        BLOCK_SIZE = 3 => "NBD_INFO_BLOCK_SIZE",
    }
}

open_code! {
    /// The type of a request (`NBD_CMD_*`).
    Command(u16) {
        /// `NBD_CMD_READ`.
        READ = 0 => "NBD_CMD_READ",
        /// `NBD_CMD_WRITE`.
        WRITE = 1 => "NBD_CMD_WRITE",
        /// `NBD_CMD_DISC`.
        DISC = 2 => "NBD_CMD_DISC",
        /// `NBD_CMD_FLUSH`.
        FLUSH = 3 => "NBD_CMD_FLUSH",
        /// `NBD_CMD_TRIM`.
        TRIM = 4 => "NBD_CMD_TRIM",
        /// `NBD_CMD_CACHE`.
        CACHE = 5 => "NBD_CMD_CACHE",
        /// `NBD_CMD_WRITE_ZEROES`.
        WRITE_ZEROES = 6 => "NBD_CMD_WRITE_ZEROES",
        /// `NBD_CMD_BLOCK_STATUS`.
        BLOCK_STATUS = 7 => "NBD_CMD_BLOCK_STATUS",
        /// `NBD_CMD_RESIZE` (experimental; not served).
        RESIZE = 8 => "NBD_CMD_RESIZE",
    }
}

open_code! {
    /// The type of a structured or extended reply chunk (`NBD_REPLY_TYPE_*`).
    ChunkType(u16) {
        /// `NBD_REPLY_TYPE_NONE`.
        NONE = 0 => "NBD_REPLY_TYPE_NONE",
        /// `NBD_REPLY_TYPE_OFFSET_DATA`.
        OFFSET_DATA = 1 => "NBD_REPLY_TYPE_OFFSET_DATA",
        /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
        OFFSET_HOLE = 2 => "NBD_REPLY_TYPE_OFFSET_HOLE",
        /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
        BLOCK_STATUS = 5 => "NBD_REPLY_TYPE_BLOCK_STATUS",
        /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
        BLOCK_STATUS_EXT = 6 => "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
        /// `NBD_REPLY_TYPE_ERROR`.
        ERROR = (1 << 15) + 1 => "NBD_REPLY_TYPE_ERROR",
        /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
        ERROR_OFFSET = (1 << 15) + 2 => "NBD_REPLY_TYPE_ERROR_OFFSET",
    }
}

open_code! {
    /// An error value of the transmission phase (`NBD_E*`).
    NbdErrno(u32) {
        /// `NBD_EPERM`.
        EPERM = 1 => "NBD_EPERM",
        /// `NBD_EIO`.
        EIO = 5 => "NBD_EIO",
        /// `NBD_ENOMEM`.
        ENOMEM = 12 => "NBD_ENOMEM",
        /// `NBD_EINVAL`.
        EINVAL = 22 => "NBD_EINVAL",
        /// `NBD_ENOSPC`.
        ENOSPC = 28 => "NBD_ENOSPC",
        /// `NBD_EOVERFLOW`.
        EOVERFLOW = 75 => "NBD_EOVERFLOW",
        /// `NBD_ENOTSUP`.
        ENOTSUP = 95 => "NBD_ENOTSUP",
        /// `NBD_ESHUTDOWN`.
        ESHUTDOWN = 108 => "NBD_ESHUTDOWN",
    }
}

impl NbdErrno {
    /// Maps a host errno (e.g. `block_core::BlockError::errno`) onto the NBD error values.
    ///
    /// The spec: "The server SHOULD return `NBD_ENOSPC` if it receives a write request
    /// including one or more sectors beyond the size of the device. It also SHOULD map the
    /// `EDQUOT` and `EFBIG` errors to `NBD_ENOSPC`." Anything without its own NBD value is
    /// `NBD_EINVAL` ("The client SHOULD treat an unexpected error value as if it had been
    /// `NBD_EINVAL`"). `EROFS` is `NBD_EPERM`, as QEMU maps it.
    pub fn from_errno(errno: i32) -> NbdErrno {
        match errno {
            libc::EPERM | libc::EROFS => NbdErrno::EPERM,
            libc::EIO => NbdErrno::EIO,
            libc::ENOMEM => NbdErrno::ENOMEM,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdErrno::ENOSPC,
            libc::EOVERFLOW => NbdErrno::EOVERFLOW,
            // EOPNOTSUPP has the same value as ENOTSUP on Linux.
            libc::ENOTSUP => NbdErrno::ENOTSUP,
            libc::ESHUTDOWN => NbdErrno::ESHUTDOWN,
            _ => NbdErrno::EINVAL,
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message is shorter than its layout needs.
    #[error("message truncated: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// Bytes remain after the message.
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
    /// The magic number is not the expected one.
    #[error("bad magic 0x{0:x}")]
    BadMagic(u64),
    /// A string is longer than the spec allows.
    #[error("string of {0} bytes is longer than 4096 bytes")]
    StringTooLong(usize),
    /// A string is not UTF-8 or contains NUL.
    #[error("string is not valid UTF-8 without NUL")]
    BadString,
    /// The same information type is requested twice.
    #[error("information type {0} requested twice")]
    DuplicateInfo(u16),
}

/// A cursor over a byte slice for decoding big-endian fields.
#[derive(Debug)]
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                needed: n,
                got: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string preceded by its 32-bit length.
    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_SIZE {
            return Err(DecodeError::StringTooLong(len));
        }
        let bytes = self.take(len)?;
        to_string(bytes)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }
}

/// Checks and converts a protocol string: UTF-8, no NUL, at most 4096 bytes.
pub fn to_string(bytes: &[u8]) -> Result<String, DecodeError> {
    if bytes.len() > MAX_STRING_SIZE {
        return Err(DecodeError::StringTooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(DecodeError::BadString);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadString)
}

/// The fixed 16-byte header of an option sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: OptionCode,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Size of the header on the wire.
    pub const SIZE: usize = 16;

    /// Decodes the header (`IHAVEOPT`, option, length).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(DecodeError::BadMagic(magic));
        }
        let option = OptionCode(r.u32()?);
        let length = r.u32()?;
        r.finish()?;
        Ok(OptionHeader { option, length })
    }

    /// Encodes the header (used by tests and clients).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option.0.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name.
    pub name: String,
    /// The information types requested, each at most once.
    pub requests: Vec<InfoType>,
}

impl InfoRequest {
    /// Decodes the option data; the spec: "32 bits, length of name (unsigned); MUST be no
    /// larger than the option data length - 6", then the name, a 16-bit count and the list.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let name = r.string()?;
        let count = r.u16()? as usize;
        // The count is bounded by the option length: check before allocating.
        let list = r.take(count * 2)?;
        r.finish()?;
        let mut requests = Vec::with_capacity(count);
        for pair in list.chunks_exact(2) {
            let info = InfoType(u16::from_be_bytes([pair[0], pair[1]]));
            // "The client MUST NOT include any information request in the list more than
            // once."
            if requests.contains(&info) {
                return Err(DecodeError::DuplicateInfo(info.0));
            }
            requests.push(info);
        }
        Ok(InfoRequest { name, requests })
    }

    /// Encodes the option data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for info in &self.requests {
            out.extend_from_slice(&info.0.to_be_bytes());
        }
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export name.
    pub name: String,
    /// The queries (`namespace:leaf`).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Decodes the option data: export name, 32-bit query count, then each query with its
    /// 32-bit length. "If the option request is syntactically invalid (such as a query length
    /// that would require reading beyond the original length given in the option header),
    /// the server MUST fail the request with `NBD_REP_ERR_INVALID`."
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let name = r.string()?;
        let count = r.u32()? as usize;
        // Each query takes at least 4 bytes: bound the allocation by the data present.
        let mut queries = Vec::with_capacity(count.min(r.buf.len() / 4));
        for _ in 0..count {
            queries.push(r.string()?);
        }
        r.finish()?;
        Ok(MetaContextRequest { name, queries })
    }

    /// Encodes the option data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            out.extend_from_slice(&(q.len() as u32).to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
    }
}

/// Appends an option reply (`OPTION_REPLY_MAGIC`, option, type, length, data).
pub fn encode_option_reply(out: &mut Vec<u8>, option: OptionCode, ty: ReplyType, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.0.to_be_bytes());
    out.extend_from_slice(&ty.0.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A request header of the transmission phase (compact or extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`cmd_flags`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's opaque cookie (the "handle" of older specs).
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length: the payload length of a write (or of any request with `PAYLOAD_LEN`), else
    /// the effect length. 32 bits wide in compact requests.
    pub length: u64,
}

impl RequestHeader {
    /// Decodes a compact (28 bytes, `extended == false`) or extended (32 bytes) header.
    pub fn decode(buf: &[u8], extended: bool) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        let expected = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected {
            return Err(DecodeError::BadMagic(magic.into()));
        }
        let flags = r.u16()?;
        let command = Command(r.u16()?);
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = if extended { r.u64()? } else { r.u32()?.into() };
        r.finish()?;
        Ok(RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// Encodes the header; in compact form the length is truncated to 32 bits.
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        if extended {
            out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.0.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            out.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
    }
}

/// Appends a simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: NbdErrno, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.0.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_HEADER: usize = 32;

/// Appends a structured (`extended == false`) or extended chunk header. `offset` is the
/// offset of the client's request ("MUST match the offset of the client's request"); it is
/// not sent in a structured header.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    ty: ChunkType,
    cookie: u64,
    offset: u64,
    payload_len: u32,
) {
    if extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.0.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    if extended {
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&u64::from(payload_len).to_be_bytes());
    } else {
        out.extend_from_slice(&payload_len.to_be_bytes());
    }
}

/// The payload of an `NBD_CMD_BLOCK_STATUS` request in its payload form: the effect length
/// and the metadata context ids the reply is limited to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatusPayload {
    /// The effect length (the header's length is the payload length in this form).
    pub effect_length: u64,
    /// The context ids.
    pub ids: Vec<u32>,
}

impl BlockStatusPayload {
    /// Decodes the payload: "The payload form MUST occupy 8 + n*4 bytes".
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let effect_length = r.u64()?;
        if r.buf.len() % 4 != 0 {
            return Err(DecodeError::Trailing(r.buf.len() % 4));
        }
        let mut ids = Vec::with_capacity(r.buf.len() / 4);
        while !r.buf.is_empty() {
            ids.push(r.u32()?);
        }
        Ok(BlockStatusPayload { effect_length, ids })
    }
}

/// The fixed 20-byte header of an option reply, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option replied to.
    pub option: OptionCode,
    /// The reply type.
    pub ty: ReplyType,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Size of the header on the wire.
    pub const SIZE: usize = 20;

    /// Decodes the header (`OPTION_REPLY_MAGIC`, option, type, length).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let option = OptionCode(r.u32()?);
        let ty = ReplyType(r.u32()?);
        let length = r.u32()?;
        r.finish()?;
        Ok(OptionReplyHeader { option, ty, length })
    }
}

/// A reply header of the transmission phase, as a client reads it: simple, structured or
/// extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (for a read without structured replies, its data follows).
    Simple {
        /// Zero, or the error of the request.
        error: NbdErrno,
        /// The request's cookie.
        cookie: u64,
    },
    /// A chunk of a structured or extended reply.
    Chunk {
        /// `REPLY_FLAG_DONE` for the last chunk.
        flags: u16,
        /// The chunk type.
        ty: ChunkType,
        /// The request's cookie.
        cookie: u64,
        /// The request's offset (extended headers only; 0 in structured chunks).
        offset: u64,
        /// Length of the payload that follows.
        length: u64,
    },
}

impl ReplyHeader {
    /// The whole header's size for a reply starting with `magic`, or `None` if `magic` is
    /// no reply magic.
    pub fn size(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(16),
            STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_HEADER),
            EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_HEADER),
            _ => None,
        }
    }

    /// Decodes a whole header (magic included).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        let header = match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: NbdErrno(r.u32()?),
                cookie: r.u64()?,
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: r.u16()?,
                ty: ChunkType(r.u16()?),
                cookie: r.u64()?,
                offset: 0,
                length: r.u32()?.into(),
            },
            EXTENDED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: r.u16()?,
                ty: ChunkType(r.u16()?),
                cookie: r.u64()?,
                offset: r.u64()?,
                length: r.u64()?,
            },
            other => return Err(DecodeError::BadMagic(other.into())),
        };
        r.finish()?;
        Ok(header)
    }

    /// The cookie of the request replied to.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reply_headers_round_trip() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, NbdErrno::EIO, 9);
        assert_eq!(ReplyHeader::size(SIMPLE_REPLY_MAGIC), Some(out.len()));
        assert_eq!(
            ReplyHeader::decode(&out),
            Ok(ReplyHeader::Simple {
                error: NbdErrno::EIO,
                cookie: 9
            })
        );
        for extended in [false, true] {
            let mut out = Vec::new();
            encode_chunk_header(&mut out, extended, 1, ChunkType::OFFSET_DATA, 3, 4096, 520);
            let magic = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
            assert_eq!(ReplyHeader::size(magic), Some(out.len()));
            assert_eq!(
                ReplyHeader::decode(&out),
                Ok(ReplyHeader::Chunk {
                    flags: 1,
                    ty: ChunkType::OFFSET_DATA,
                    cookie: 3,
                    offset: if extended { 4096 } else { 0 },
                    length: 520
                })
            );
            assert!(ReplyHeader::decode(&out[..out.len() - 1]).is_err());
        }
        let mut out = Vec::new();
        encode_option_reply(&mut out, OptionCode::GO, ReplyType::ERR_UNKNOWN, b"no");
        let h = OptionReplyHeader::decode(&out[..OptionReplyHeader::SIZE]).unwrap();
        assert_eq!(
            (h.option, h.ty, h.length),
            (OptionCode::GO, ReplyType::ERR_UNKNOWN, 2)
        );
        assert_eq!(ReplyHeader::size(0), None);
    }

    #[test]
    fn compact_request_fixture() {
        let bytes = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // type: WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0x00, // offset 4096
            0, 0, 0x02, 0x00, // length 512
        ];
        let h = RequestHeader::decode(&bytes, false).unwrap();
        assert_eq!(h.flags, cmd_flags::FUA);
        assert_eq!(h.command, Command::WRITE);
        assert_eq!(h.cookie, 0x0102_0304_0506_0708);
        assert_eq!(h.offset, 4096);
        assert_eq!(h.length, 512);
        let mut out = Vec::new();
        h.encode(false, &mut out);
        assert_eq!(out, bytes);
        // The same bytes are not an extended request.
        assert!(RequestHeader::decode(&bytes, true).is_err());
        // Short reads are errors, not panics.
        for n in 0..bytes.len() {
            assert!(matches!(
                RequestHeader::decode(&bytes[..n], false),
                Err(DecodeError::Truncated { .. }) | Err(DecodeError::BadMagic(_))
            ));
        }
    }

    #[test]
    fn extended_request_fixture() {
        let bytes = [
            0x21, 0xe4, 0x1c, 0x71, // magic
            0x00, 0x20, // flags: PAYLOAD_LEN
            0x00, 0x07, // type: BLOCK_STATUS
            0, 0, 0, 0, 0, 0, 0, 9, // cookie
            0, 0, 0, 0, 0, 0, 0, 0, // offset 0
            0, 0, 0, 1, 0, 0, 0, 0, // length 2^32
        ];
        let h = RequestHeader::decode(&bytes, true).unwrap();
        assert_eq!(h.command, Command::BLOCK_STATUS);
        assert_eq!(h.length, 1 << 32);
        let mut out = Vec::new();
        h.encode(true, &mut out);
        assert_eq!(out, bytes);
    }

    #[test]
    fn info_request_fixture() {
        let bytes = [
            0, 0, 0, 1, b'e', // name "e"
            0, 2, // two requests
            0, 3, // BLOCK_SIZE
            0, 1, // NAME
        ];
        let r = InfoRequest::decode(&bytes).unwrap();
        assert_eq!(r.name, "e");
        assert_eq!(r.requests, vec![InfoType::BLOCK_SIZE, InfoType::NAME]);
        assert_eq!(
            InfoRequest::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated { needed: 4, got: 3 })
        );
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(InfoRequest::decode(&longer), Err(DecodeError::Trailing(1)));
        let dup = [0, 0, 0, 0, 0, 2, 0, 3, 0, 3];
        assert_eq!(
            InfoRequest::decode(&dup),
            Err(DecodeError::DuplicateInfo(3))
        );
    }

    #[test]
    fn meta_request_rejects_long_and_bad_strings() {
        let mut data = Vec::new();
        data.extend_from_slice(&5000u32.to_be_bytes());
        assert_eq!(
            MetaContextRequest::decode(&data),
            Err(DecodeError::StringTooLong(5000))
        );
        let bad = [0, 0, 0, 2, b'a', 0, 0, 0, 0, 0];
        assert_eq!(
            MetaContextRequest::decode(&bad),
            Err(DecodeError::BadString)
        );
        // A huge query count with no data is truncated, not a huge allocation.
        let huge = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            MetaContextRequest::decode(&huge),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn errno_table() {
        let rows = [
            (libc::EPERM, NbdErrno::EPERM),
            (libc::EROFS, NbdErrno::EPERM),
            (libc::EIO, NbdErrno::EIO),
            (libc::ENOMEM, NbdErrno::ENOMEM),
            (libc::EINVAL, NbdErrno::EINVAL),
            (libc::ENOSPC, NbdErrno::ENOSPC),
            (libc::EDQUOT, NbdErrno::ENOSPC),
            (libc::EFBIG, NbdErrno::ENOSPC),
            (libc::EOVERFLOW, NbdErrno::EOVERFLOW),
            (libc::ENOTSUP, NbdErrno::ENOTSUP),
            (libc::EOPNOTSUPP, NbdErrno::ENOTSUP),
            (libc::ESHUTDOWN, NbdErrno::ESHUTDOWN),
            (libc::ENOENT, NbdErrno::EINVAL),
            (libc::EBADF, NbdErrno::EINVAL),
            (0, NbdErrno::EINVAL),
        ];
        for (errno, nbd) in rows {
            assert_eq!(NbdErrno::from_errno(errno), nbd, "errno {errno}");
        }
        // The NBD values are the Linux errno values the spec names.
        assert_eq!(NbdErrno::EPERM.0, 1);
        assert_eq!(NbdErrno::EIO.0, 5);
        assert_eq!(NbdErrno::ENOMEM.0, 12);
        assert_eq!(NbdErrno::EINVAL.0, 22);
        assert_eq!(NbdErrno::ENOSPC.0, 28);
        assert_eq!(NbdErrno::EOVERFLOW.0, 75);
        assert_eq!(NbdErrno::ENOTSUP.0, 95);
        assert_eq!(NbdErrno::ESHUTDOWN.0, 108);
    }

    #[test]
    fn unknown_codes_stay_open() {
        assert_eq!(OptionCode(42).name(), None);
        assert_eq!(format!("{:?}", OptionCode(42)), "OptionCode(42)");
        assert_eq!(format!("{}", OptionCode::GO), "NBD_OPT_GO");
        assert_eq!(Command(99).name(), None);
    }

    proptest! {
        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), ext: bool) {
            if let Ok(h) = RequestHeader::decode(&bytes, ext) {
                let mut out = Vec::new();
                h.encode(ext, &mut out);
                prop_assert_eq!(out, bytes);
            }
        }

        #[test]
        fn request_roundtrip(flags: u16, cmd: u16, cookie: u64, offset: u64, length: u64, ext: bool) {
            let length = if ext { length } else { length & 0xffff_ffff };
            let h = RequestHeader { flags, command: Command(cmd), cookie, offset, length };
            let mut out = Vec::new();
            h.encode(ext, &mut out);
            prop_assert_eq!(RequestHeader::decode(&out, ext), Ok(h));
        }

        #[test]
        fn option_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = OptionHeader::decode(&bytes);
            if let Ok(r) = InfoRequest::decode(&bytes) {
                let mut out = Vec::new();
                r.encode(&mut out);
                prop_assert_eq!(out, bytes.clone());
            }
            if let Ok(r) = MetaContextRequest::decode(&bytes) {
                let mut out = Vec::new();
                r.encode(&mut out);
                prop_assert_eq!(out, bytes.clone());
            }
            if let Ok(p) = BlockStatusPayload::decode(&bytes) {
                prop_assert_eq!(8 + 4 * p.ids.len(), bytes.len());
            }
        }

        #[test]
        fn meta_request_roundtrip(name in "[a-z]{0,8}", queries in proptest::collection::vec("[a-z:]{0,12}", 0..4)) {
            let r = MetaContextRequest { name, queries };
            let mut out = Vec::new();
            r.encode(&mut out);
            prop_assert_eq!(MetaContextRequest::decode(&out), Ok(r));
        }
    }
}
