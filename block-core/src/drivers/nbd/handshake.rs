//! The client side of the fixed newstyle handshake: TLS, extended headers (else structured
//! replies), the metadata context for block status, and `NBD_OPT_GO` (`NBD_OPT_EXPORT_NAME`
//! with servers that do not know it).

use super::stream::{self, Stream};
use super::Config;
use nbd_proto::{
    client_flags, handshake_flags, InfoRequest, InfoType, MetaContextRequest, OptionCode,
    OptionHeader, OptionReplyHeader, ReplyType, IHAVEOPT, MAX_STRING_SIZE, NBDMAGIC,
};
use std::fmt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest option reply accepted (the longest legitimate one is a metadata context:
/// a 4-byte id and a name of at most 4096 bytes; errors carry a message of that size).
const MAX_OPTION_REPLY: u32 = 2 * MAX_STRING_SIZE as u32 + 64;

/// Which replies the transmission phase uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Simple replies only (old servers).
    Simple,
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Extended headers (`NBD_OPT_EXTENDED_HEADERS`): 64-bit lengths everywhere.
    Extended,
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`transmission_flags`).
    pub flags: u16,
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size (0: not sent).
    pub min_block: u32,
    /// Preferred block size (0: not sent).
    pub pref_block: u32,
    /// Maximum payload (0: not sent).
    pub max_block: u32,
    /// The reply mode.
    pub mode: Mode,
    /// The id of the metadata context that block status asks for, if the server has it.
    pub context: Option<u32>,
    /// That context is `qemu:allocation-depth` (through `x-dirty-bitmap`).
    pub alloc_depth: bool,
}

/// Why a handshake failed: QEMU's wording where it has one.
#[derive(Debug)]
pub enum HandshakeError {
    /// The connection failed (or timed out) while negotiating.
    Io(std::io::Error),
    /// The server broke the protocol.
    Protocol(String),
    /// The server refused an option; `hint` is its own message.
    Refused {
        /// Our message.
        message: String,
        /// What the server said.
        hint: Option<String>,
    },
    /// The TLS handshake failed.
    Tls(String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "Failed to read initial magic: {e}"),
            HandshakeError::Protocol(m) => f.write_str(m),
            // The server's own words are QEMU's error hint, which QMP leaves out.
            HandshakeError::Refused { message, .. } => f.write_str(message),
            HandshakeError::Tls(m) => write!(f, "TLS handshake failed: {m}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

fn protocol(m: impl Into<String>) -> HandshakeError {
    HandshakeError::Protocol(m.into())
}

/// Negotiates with the server at the other end of `s`: returns the stream to use for the
/// transmission phase (TLS-wrapped when the config has credentials) and what was agreed.
pub async fn negotiate(
    mut s: Stream,
    cfg: &Config,
) -> Result<(Stream, ExportInfo), HandshakeError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8 bytes"));
    if magic != NBDMAGIC {
        return Err(protocol("Bad initial magic received"));
    }
    let opt = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    if opt != IHAVEOPT {
        // The old style handshake (no options): not supported, as in QEMU since 2.x.
        return Err(protocol("Server is not a newstyle NBD server"));
    }
    let gflags = u16::from_be_bytes([hello[16], hello[17]]);
    if gflags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(protocol(
            "Server does not support fixed newstyle negotiation",
        ));
    }
    let mut cflags = client_flags::FIXED_NEWSTYLE;
    let no_zeroes = gflags & handshake_flags::NO_ZEROES != 0;
    if no_zeroes {
        cflags |= client_flags::NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await?;

    if let Some(tls) = &cfg.tls {
        send_option(&mut s, OptionCode::STARTTLS, &[]).await?;
        let (h, data) = read_reply(&mut s, OptionCode::STARTTLS).await?;
        if h.ty != ReplyType::ACK {
            return Err(refusal(
                OptionCode::STARTTLS,
                h.ty,
                &data,
                "Server rejected request to start TLS",
            ));
        }
        s = stream::start_tls(s, tls)
            .await
            .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    }

    let mut mode = Mode::Simple;
    send_option(&mut s, OptionCode::EXTENDED_HEADERS, &[]).await?;
    let (h, data) = read_reply(&mut s, OptionCode::EXTENDED_HEADERS).await?;
    if h.ty == ReplyType::ACK {
        mode = Mode::Extended;
    } else {
        check_soft_refusal(OptionCode::EXTENDED_HEADERS, h.ty, &data)?;
        send_option(&mut s, OptionCode::STRUCTURED_REPLY, &[]).await?;
        let (h, data) = read_reply(&mut s, OptionCode::STRUCTURED_REPLY).await?;
        if h.ty == ReplyType::ACK {
            mode = Mode::Structured;
        } else {
            check_soft_refusal(OptionCode::STRUCTURED_REPLY, h.ty, &data)?;
        }
    }

    let mut context = None;
    let query = cfg
        .dirty_bitmap
        .clone()
        .unwrap_or_else(|| "base:allocation".to_string());
    if mode >= Mode::Structured {
        let mut data = Vec::new();
        MetaContextRequest {
            name: cfg.export.clone(),
            queries: vec![query.clone()],
        }
        .encode(&mut data);
        send_option(&mut s, OptionCode::SET_META_CONTEXT, &data).await?;
        loop {
            let (h, data) = read_reply(&mut s, OptionCode::SET_META_CONTEXT).await?;
            match h.ty {
                ReplyType::ACK => break,
                ReplyType::META_CONTEXT => {
                    if data.len() < 4 {
                        return Err(protocol("Invalid NBD_REP_META_CONTEXT reply"));
                    }
                    let id = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
                    let name = String::from_utf8_lossy(&data[4..]);
                    if name != query {
                        return Err(protocol(format!(
                            "Unexpected context name '{name}' in reply to query '{query}'"
                        )));
                    }
                    context = Some(id);
                }
                ty => {
                    // A server without metadata contexts: block status reports data.
                    check_soft_refusal(OptionCode::SET_META_CONTEXT, ty, &data)?;
                    break;
                }
            }
        }
    }
    if cfg.dirty_bitmap.is_some() && context.is_none() {
        return Err(protocol(format!(
            "requested x-dirty-bitmap {query} not found"
        )));
    }

    let mut data = Vec::new();
    InfoRequest {
        name: cfg.export.clone(),
        requests: vec![InfoType::BLOCK_SIZE],
    }
    .encode(&mut data);
    send_option(&mut s, OptionCode::GO, &data).await?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 0,
        pref_block: 0,
        max_block: 0,
        mode,
        context,
        alloc_depth: query == "qemu:allocation-depth",
    };
    let mut have_export = false;
    loop {
        let (h, data) = read_reply(&mut s, OptionCode::GO).await?;
        match h.ty {
            ReplyType::ACK => break,
            ReplyType::INFO => {
                if data.len() < 2 {
                    return Err(protocol("Invalid NBD_REP_INFO reply"));
                }
                match InfoType(u16::from_be_bytes([data[0], data[1]])) {
                    InfoType::EXPORT => {
                        if data.len() != 12 {
                            return Err(protocol("Invalid NBD_INFO_EXPORT length"));
                        }
                        info.size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                        info.flags = u16::from_be_bytes([data[10], data[11]]);
                        have_export = true;
                    }
                    InfoType::BLOCK_SIZE => {
                        if data.len() != 14 {
                            return Err(protocol("Invalid NBD_INFO_BLOCK_SIZE length"));
                        }
                        let word = |i: usize| {
                            u32::from_be_bytes(data[i..i + 4].try_into().expect("4 bytes"))
                        };
                        let (min, pref, max) = (word(2), word(6), word(10));
                        if !min.is_power_of_two() || min > 65536 {
                            return Err(protocol(format!(
                                "server minimum block size {min} is not a power of two"
                            )));
                        }
                        if pref < min || !pref.is_power_of_two() {
                            return Err(protocol(format!(
                                "server preferred block size {pref} is not valid"
                            )));
                        }
                        if max < pref.min(1 << 20) {
                            return Err(protocol(format!(
                                "server maximum block size {max} is not valid"
                            )));
                        }
                        (info.min_block, info.pref_block, info.max_block) = (min, pref, max);
                    }
                    // Other information (name, description) is not needed.
                    _ => {}
                }
            }
            ReplyType::ERR_UNSUP => {
                // A server without NBD_OPT_GO: the old way, which cannot fail politely.
                return export_name(s, cfg, info, no_zeroes).await;
            }
            ty => return Err(refusal(OptionCode::GO, ty, &data, "")),
        }
    }
    if !have_export {
        return Err(protocol("broken server omitted NBD_INFO_EXPORT"));
    }
    check_info(&info)?;
    Ok((s, info))
}

/// `NBD_OPT_EXPORT_NAME`, for servers that do not know `NBD_OPT_GO`.
async fn export_name(
    mut s: Stream,
    cfg: &Config,
    mut info: ExportInfo,
    no_zeroes: bool,
) -> Result<(Stream, ExportInfo), HandshakeError> {
    send_option(&mut s, OptionCode::EXPORT_NAME, cfg.export.as_bytes()).await?;
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await?;
    info.size = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
    info.flags = u16::from_be_bytes([buf[8], buf[9]]);
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes).await?;
    }
    check_info(&info)?;
    Ok((s, info))
}

fn check_info(info: &ExportInfo) -> Result<(), HandshakeError> {
    if info.size > i64::MAX as u64 {
        return Err(protocol(format!("export size {} is too large", info.size)));
    }
    if info.min_block > 0 && info.size % u64::from(info.min_block) != 0 {
        return Err(protocol(format!(
            "export size {} is not a multiple of minimum block size {}",
            info.size, info.min_block
        )));
    }
    Ok(())
}

async fn send_option(
    s: &mut Stream,
    option: OptionCode,
    data: &[u8],
) -> Result<(), HandshakeError> {
    let mut out = Vec::with_capacity(OptionHeader::SIZE + data.len());
    OptionHeader {
        option,
        length: data.len() as u32,
    }
    .encode(&mut out);
    out.extend_from_slice(data);
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

async fn read_reply(
    s: &mut Stream,
    option: OptionCode,
) -> Result<(OptionReplyHeader, Vec<u8>), HandshakeError> {
    let mut buf = [0u8; OptionReplyHeader::SIZE];
    s.read_exact(&mut buf).await?;
    let h = OptionReplyHeader::decode(&buf)
        .map_err(|e| protocol(format!("Invalid option reply: {e}")))?;
    if h.option != option {
        return Err(protocol(format!(
            "Unexpected option type {} (expected {option})",
            h.option
        )));
    }
    // The limit before the allocation.
    if h.length > MAX_OPTION_REPLY {
        return Err(protocol(format!(
            "server's reply to {option} is too long ({} bytes)",
            h.length
        )));
    }
    let mut data = vec![0u8; h.length as usize];
    s.read_exact(&mut data).await?;
    Ok((h, data))
}

/// The errors that mean "the server does not have this optional feature": anything else
/// ends the handshake, as in QEMU (`nbd_handle_reply_err`).
fn check_soft_refusal(
    option: OptionCode,
    ty: ReplyType,
    data: &[u8],
) -> Result<(), HandshakeError> {
    match ty {
        ReplyType::ERR_UNSUP | ReplyType::ERR_POLICY | ReplyType::ERR_INVALID => Ok(()),
        ty if ty.0 & (1 << 31) != 0 => Err(refusal(option, ty, data, "")),
        ty => Err(protocol(format!("Unexpected reply type {ty} to {option}"))),
    }
}

fn refusal(option: OptionCode, ty: ReplyType, data: &[u8], message: &str) -> HandshakeError {
    let hint = (!data.is_empty()).then(|| String::from_utf8_lossy(data).into_owned());
    let message = if !message.is_empty() {
        message.to_string()
    } else {
        match ty {
            ReplyType::ERR_UNKNOWN => "Requested export not available".to_string(),
            ReplyType::ERR_POLICY => format!("Requested option {option} is forbidden"),
            ReplyType::ERR_TLS_REQD => format!("TLS negotiation required before option {option}"),
            ReplyType::ERR_SHUTDOWN => format!("Server shutting down before option {option}"),
            ReplyType::ERR_UNSUP => {
                format!("Requested option {option} is unsupported by the server")
            }
            ReplyType::ERR_INVALID => format!("Requested option {option} is invalid"),
            ReplyType::ERR_BLOCK_SIZE_REQD => {
                format!("Server requires INFO_BLOCK_SIZE for option {option}")
            }
            ReplyType::ERR_TOO_BIG => format!("Request for option {option} is too big"),
            ty => format!(
                "Unknown error code {} when processing option {option}",
                ty.0
            ),
        }
    };
    HandshakeError::Refused { message, hint }
}
