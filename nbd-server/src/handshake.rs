//! The handshake phase: fixed newstyle negotiation and option haggling.
//!
//! ```text
//!  server greeting ──> client flags ──> option* ──┬─> NBD_OPT_GO ack ─────────> transmission
//!                                                 ├─> NBD_OPT_EXPORT_NAME ok ─> transmission
//!                                                 ├─> NBD_OPT_ABORT ──────────> closed
//!                                                 ├─> NBD_OPT_STARTTLS ack ───> TLS handshake,
//!                                                 │     authorization, option* over TLS
//!                                                 └─> protocol violation ─────> hard disconnect
//! ```
//!
//! `Negotiator` is the state machine: it takes one decoded option at a time, appends the
//! bytes of its replies to an output buffer and says what happens next. It does no I/O;
//! `negotiate` drives it over a stream. TLS is a state of the negotiator (`TlsState`):
//! without TLS configured `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`; with it,
//! every other option (but `NBD_OPT_ABORT`) is refused until `NBD_OPT_STARTTLS` succeeds,
//! then the driver wraps the stream and the negotiator forgets every earlier option.

use crate::export::Export;
use crate::meta::{self, MetaContext, QueryMode};
use crate::proto::{
    self, client_flags, encode_option_reply, handshake_flags, InfoRequest, InfoType,
    MetaContextRequest, OptionCode, OptionHeader, ReplyType, MAX_PAYLOAD, MAX_STRING_SIZE,
};
use crate::tls::{AcceptError, MaybeTls, TlsConfig};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Option data longer than this is drained rather than buffered, and refused with
/// `NBD_REP_ERR_TOO_BIG` (any valid option of this server is far smaller).
pub const OPTION_DATA_LIMIT: u32 = 64 * 1024;

/// Option data longer than this ends the connection, as QEMU does ("len is larger than max
/// len"): draining it would let a client keep the server busy for nothing.
pub const OPTION_LENGTH_MAX: u32 = MAX_PAYLOAD;

/// Why a handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading from or writing to the client failed (or it closed the connection).
    #[error("I/O error during the handshake")]
    Io(#[source] io::Error),
    /// The client set a client flag the server does not know: "the server MUST drop the TCP
    /// connection if the client sets an unknown flag".
    #[error("unknown client flags 0x{0:x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic")]
    BadMagic(#[source] proto::DecodeError),
    /// An option's data is longer than [`OPTION_LENGTH_MAX`].
    #[error("option {option} data length {length} is larger than the maximum")]
    OptionTooLong {
        /// The option.
        option: OptionCode,
        /// Its data length.
        length: u32,
    },
    /// A client without fixed newstyle sent an option other than `NBD_OPT_EXPORT_NAME`.
    #[error("option {0} without fixed newstyle negotiation")]
    NotFixedNewstyle(OptionCode),
    /// `NBD_OPT_EXPORT_NAME` could not be honoured; it cannot return an error, so "the
    /// server MUST terminate the session".
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    ExportNameRefused(String),
    /// The client sent `NBD_OPT_ABORT`.
    #[error("the client aborted the negotiation")]
    Aborted,
    /// The handshake did not complete within the server's deadline.
    #[error("the handshake did not complete in time")]
    Timeout,
    /// The server is stopping or the export was removed.
    #[error("the server is shutting down")]
    Shutdown,
    /// TLS is required and the client sent `NBD_OPT_EXPORT_NAME` before it: "as this
    /// request cannot error, it MUST terminate the session".
    #[error("option {0} not permitted before TLS")]
    TlsRequired(OptionCode),
    /// `NBD_OPT_STARTTLS` came with data; QEMU drops such a client after the error reply.
    #[error("NBD_OPT_STARTTLS with data")]
    StartTlsData,
    /// The TLS handshake failed (bad or missing client certificate, protocol error, ...).
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    /// The authorization hook refused the client.
    #[error("client not authorized")]
    Unauthorized(#[source] crate::tls::Refusal),
}

/// What kind of headers the transmission phase uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Old newstyle client (no `NBD_FLAG_C_FIXED_NEWSTYLE`): only `NBD_OPT_EXPORT_NAME`.
    ExportName,
    /// Fixed newstyle, simple replies only.
    Simple,
    /// Structured replies negotiated.
    Structured,
    /// Extended headers negotiated.
    Extended,
}

/// The outcome of a successful handshake.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) export: Arc<Export>,
    pub(crate) mode: Mode,
    /// The selected metadata contexts (empty if none or for another export).
    pub(crate) contexts: Vec<MetaContext>,
    /// The export size announced.
    pub(crate) size: u64,
    /// The transmission flags announced.
    pub(crate) flags: u16,
}

/// The data of one option, as the driver hands it to the negotiator.
#[derive(Debug)]
pub(crate) enum OptionData<'a> {
    /// The whole data.
    Read(&'a [u8]),
    /// The data was too long (or the option unknown) and has been drained unread.
    Drained,
}

/// What the driver does after an option.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send the replies and read the next option.
    Continue,
    /// Send the replies and enter transmission.
    Go(Session),
    /// Send the replies and close the connection (client abort).
    Abort,
    /// Close the connection without sending anything more.
    Disconnect(HandshakeError),
    /// Send the replies and close the connection.
    Fail(HandshakeError),
    /// Send the replies (an `NBD_REP_ACK` to `NBD_OPT_STARTTLS`), run the TLS handshake on
    /// the stream, then call [`Negotiator::tls_started`] and read the next option over TLS.
    StartTls,
}

/// Where the negotiation stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsState {
    /// The server has no TLS (the spec's NOTLS mode).
    Off,
    /// TLS is configured and not started yet: only `STARTTLS` and `ABORT` are served.
    Required,
    /// The negotiation runs over TLS.
    Active,
}

/// Where the negotiator finds exports.
pub(crate) trait ExportSource {
    /// The export named `name`, if it exists and is not being removed.
    fn find(&self, name: &str) -> Option<Arc<Export>>;
    /// Every export, in name order.
    fn all(&self) -> Vec<Arc<Export>>;
}

/// The option-haggling state machine.
#[derive(Debug)]
pub(crate) struct Negotiator {
    fixed_newstyle: bool,
    no_zeroes: bool,
    mode: Mode,
    /// The export named by the last `NBD_OPT_SET_META_CONTEXT` and the contexts it selected.
    contexts: Option<(String, Vec<MetaContext>)>,
    tls: TlsState,
}

impl Negotiator {
    /// The handshake flags the server sends.
    pub(crate) const HANDSHAKE_FLAGS: u16 =
        handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;

    /// Starts a negotiation from the client flags; `tls` says whether the server requires
    /// TLS.
    pub(crate) fn new(client: u32, tls: bool) -> Result<Self, HandshakeError> {
        let known = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
        // "the server MUST drop the TCP connection if the client sets an unknown flag, or a
        // flag that does not match something advertised by the server."
        if client & !known != 0 {
            return Err(HandshakeError::UnknownClientFlags(client));
        }
        let fixed_newstyle = client & client_flags::FIXED_NEWSTYLE != 0;
        Ok(Negotiator {
            fixed_newstyle,
            no_zeroes: client & client_flags::NO_ZEROES != 0,
            mode: if fixed_newstyle {
                Mode::Simple
            } else {
                Mode::ExportName
            },
            contexts: None,
            tls: if tls {
                TlsState::Required
            } else {
                TlsState::Off
            },
        })
    }

    /// The TLS handshake succeeded: the negotiation starts over, as in QEMU. "If the client
    /// requests `NBD_OPT_STARTTLS` after this option, it MUST renegotiate structured replies
    /// and any other dependent extensions"; contexts count only when selected "with no
    /// intervening `NBD_OPT_STARTTLS`".
    pub(crate) fn tls_started(&mut self) {
        self.tls = TlsState::Active;
        self.mode = Mode::Simple;
        self.contexts = None;
    }

    /// Options before TLS in FORCEDTLS mode, as QEMU's `nbd_negotiate_options` serves them.
    fn before_tls(&mut self, option: OptionCode, data: &OptionData<'_>, out: &mut Vec<u8>) -> Step {
        match option {
            OptionCode::STARTTLS => {
                if !matches!(data, OptionData::Read(&[])) {
                    // "the server SHOULD reject a request that includes data with
                    // NBD_REP_ERR_INVALID"; QEMU then drops the connection "if the client
                    // can't start a TLS negotiation correctly".
                    error_reply(
                        out,
                        option,
                        ReplyType::ERR_INVALID,
                        &format!("option '{option}' has unexpected length"),
                    );
                    return Step::Fail(HandshakeError::StartTlsData);
                }
                // "If the server receives NBD_OPT_STARTTLS prior to negotiating TLS, it
                // MUST reply with NBD_REP_ACK."; "the server MUST be prepared for a TLS
                // handshake".
                encode_option_reply(out, option, ReplyType::ACK, &[]);
                Step::StartTls
            }
            OptionCode::ABORT => {
                // "The server MUST reply with NBD_REP_ACK" (QEMU answers
                // NBD_REP_ERR_TLS_REQD here; either way the connection then closes).
                encode_option_reply(out, option, ReplyType::ACK, &[]);
                Step::Abort
            }
            // "If the server receives a request to enter transmission mode via
            // NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this request
            // cannot error, it MUST terminate the session."
            OptionCode::EXPORT_NAME => Step::Disconnect(HandshakeError::TlsRequired(option)),
            _ => {
                // "If the server receives any other option, including NBD_OPT_INFO and
                // unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has
                // not been initiated".
                error_reply(
                    out,
                    option,
                    ReplyType::ERR_TLS_REQD,
                    &format!("Option 0x{:x} not permitted before TLS", option.0),
                );
                Step::Continue
            }
        }
    }

    /// Handles one option, appending its replies to `out`.
    pub(crate) fn on_option(
        &mut self,
        option: OptionCode,
        data: OptionData<'_>,
        exports: &(dyn ExportSource + Sync),
        out: &mut Vec<u8>,
    ) -> Step {
        if !self.fixed_newstyle && option != OptionCode::EXPORT_NAME {
            // Non-fixed newstyle: "the server would immediately close the connection".
            return Step::Disconnect(HandshakeError::NotFixedNewstyle(option));
        }
        if self.tls == TlsState::Required {
            return self.before_tls(option, &data, out);
        }
        let data = match data {
            OptionData::Read(d) => d,
            OptionData::Drained => return self.on_drained(option, out),
        };
        match option {
            OptionCode::EXPORT_NAME => self.export_name(data, exports, out),
            OptionCode::ABORT => {
                // "The server MUST reply with NBD_REP_ACK" (data is ignored, as the spec
                // asks: "a server SHOULD ignore any data sent by the client").
                encode_option_reply(out, option, ReplyType::ACK, &[]);
                Step::Abort
            }
            OptionCode::LIST => {
                if !data.is_empty() {
                    return reject_length(option, out);
                }
                for export in exports.all() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(export.name.as_bytes());
                    if let Some(desc) = &export.description {
                        d.extend_from_slice(desc.as_bytes());
                    }
                    encode_option_reply(out, option, ReplyType::SERVER, &d);
                }
                encode_option_reply(out, option, ReplyType::ACK, &[]);
                Step::Continue
            }
            OptionCode::STARTTLS => {
                if !data.is_empty() {
                    return reject_length(option, out);
                }
                if self.tls == TlsState::Active {
                    // "If the server receives NBD_OPT_STARTTLS when TLS has already been
                    // negotiated, it MUST reply with NBD_REP_ERR_INVALID" (QEMU: "TLS
                    // already enabled").
                    error_reply(out, option, ReplyType::ERR_INVALID, "TLS already enabled");
                } else {
                    // NOTLS mode: "If the server receives NBD_OPT_STARTTLS it MUST respond
                    // with NBD_REP_ERR_POLICY (if it does not support TLS for policy
                    // reasons)".
                    error_reply(out, option, ReplyType::ERR_POLICY, "TLS not configured");
                }
                Step::Continue
            }
            OptionCode::INFO | OptionCode::GO => self.info(option, data, exports, out),
            OptionCode::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return reject_length(option, out);
                }
                if self.mode >= Mode::Extended {
                    error_reply(
                        out,
                        option,
                        ReplyType::ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if self.mode >= Mode::Structured {
                    error_reply(
                        out,
                        option,
                        ReplyType::ERR_INVALID,
                        "structured reply already negotiated",
                    );
                } else {
                    self.mode = Mode::Structured;
                    encode_option_reply(out, option, ReplyType::ACK, &[]);
                }
                Step::Continue
            }
            OptionCode::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    return reject_length(option, out);
                }
                if self.mode >= Mode::Extended {
                    error_reply(
                        out,
                        option,
                        ReplyType::ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    self.mode = Mode::Extended;
                    encode_option_reply(out, option, ReplyType::ACK, &[]);
                }
                Step::Continue
            }
            OptionCode::LIST_META_CONTEXT | OptionCode::SET_META_CONTEXT => {
                self.meta_context(option, data, exports, out)
            }
            _ => {
                // "NBD_REP_ERR_UNSUP ... The option sent by the client is unknown by this
                // server implementation"; the connection lives on.
                error_reply(
                    out,
                    option,
                    ReplyType::ERR_UNSUP,
                    &format!("Unsupported option {}", option.0),
                );
                Step::Continue
            }
        }
    }

    fn on_drained(&mut self, option: OptionCode, out: &mut Vec<u8>) -> Step {
        match option {
            OptionCode::EXPORT_NAME => Step::Disconnect(HandshakeError::ExportNameRefused(
                "export name too long".into(),
            )),
            OptionCode::ABORT => {
                encode_option_reply(out, option, ReplyType::ACK, &[]);
                Step::Abort
            }
            OptionCode::SET_META_CONTEXT => {
                // "Issuing this command replaces all previously-set metadata contexts
                // (including when this command fails)".
                self.contexts = None;
                error_reply(out, option, ReplyType::ERR_TOO_BIG, "option data too long");
                Step::Continue
            }
            _ if option.name().is_none() => {
                error_reply(
                    out,
                    option,
                    ReplyType::ERR_UNSUP,
                    &format!("Unsupported option {}", option.0),
                );
                Step::Continue
            }
            _ => {
                error_reply(out, option, ReplyType::ERR_TOO_BIG, "option data too long");
                Step::Continue
            }
        }
    }

    /// The contexts selected for `export`, if the last `SET_META_CONTEXT` named it.
    fn contexts_for(&self, export: &str) -> Vec<MetaContext> {
        match &self.contexts {
            Some((name, list)) if name == export => list.clone(),
            _ => Vec::new(),
        }
    }

    /// The session `option` would enter. `NBD_FLAG_BLOCK_STATUS_PAYLOAD` "SHOULD NOT [be
    /// advertised] in response to NBD_OPT_GO if the client does not negotiate metacontexts";
    /// like QEMU, it is always shown to `NBD_OPT_INFO` with extended headers.
    fn session(&self, export: Arc<Export>, option: OptionCode) -> Session {
        let contexts = self.contexts_for(&export.name);
        let flags = export.transmission_flags(
            self.mode >= Mode::Structured,
            self.mode >= Mode::Extended && (!contexts.is_empty() || option == OptionCode::INFO),
        );
        Session {
            size: export.size(),
            flags,
            export,
            mode: self.mode,
            contexts,
        }
    }

    fn export_name(&mut self, data: &[u8], exports: &dyn ExportSource, out: &mut Vec<u8>) -> Step {
        // "a client that has used NBD_OPT_EXTENDED_HEADERS to negotiate extended headers
        // MUST NOT use this option."
        if self.mode >= Mode::Extended {
            return Step::Disconnect(HandshakeError::ExportNameRefused(
                "NBD_OPT_EXPORT_NAME after extended headers".into(),
            ));
        }
        let name = match proto::to_string(data) {
            Ok(name) => name,
            Err(e) => return Step::Disconnect(HandshakeError::ExportNameRefused(e.to_string())),
        };
        let Some(export) = exports.find(&name) else {
            return Step::Disconnect(HandshakeError::ExportNameRefused(format!(
                "export '{}' not present",
                sanitize(&name)
            )));
        };
        let session = self.session(export, OptionCode::EXPORT_NAME);
        out.extend_from_slice(&session.size.to_be_bytes());
        out.extend_from_slice(&session.flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Step::Go(session)
    }

    fn info(
        &mut self,
        option: OptionCode,
        data: &[u8],
        exports: &(dyn ExportSource + Sync),
        out: &mut Vec<u8>,
    ) -> Step {
        let request = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                error_reply(out, option, ReplyType::ERR_INVALID, &e.to_string());
                return Step::Continue;
            }
        };
        let Some(export) = find_or_refuse(exports, &request.name, option, out) else {
            return Step::Continue;
        };
        let wants = |t: InfoType| request.requests.contains(&t);
        let block_size_requested = wants(InfoType::BLOCK_SIZE);
        if wants(InfoType::NAME) {
            let mut d = InfoType::NAME.0.to_be_bytes().to_vec();
            d.extend_from_slice(export.name.as_bytes());
            encode_option_reply(out, option, ReplyType::INFO, &d);
        }
        if let (true, Some(desc)) = (wants(InfoType::DESCRIPTION), &export.description) {
            let mut d = InfoType::DESCRIPTION.0.to_be_bytes().to_vec();
            d.extend_from_slice(desc.as_bytes());
            encode_option_reply(out, option, ReplyType::INFO, &d);
        }
        // Block sizes as QEMU's nbd_negotiate_handle_info computes them: the real minimum
        // only if the client will obey it (it asked, or this is NBD_OPT_INFO), else 1 for
        // compatibility; preferred max(4096, minimum); maximum 32 MiB.
        let alignment = export.alignment();
        let minimum = if option == OptionCode::INFO || block_size_requested {
            alignment
        } else {
            1
        };
        let mut d = InfoType::BLOCK_SIZE.0.to_be_bytes().to_vec();
        d.extend_from_slice(&minimum.to_be_bytes());
        d.extend_from_slice(&minimum.max(4096).to_be_bytes());
        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        encode_option_reply(out, option, ReplyType::INFO, &d);

        let session = self.session(export, option);
        let mut d = InfoType::EXPORT.0.to_be_bytes().to_vec();
        d.extend_from_slice(&session.size.to_be_bytes());
        d.extend_from_slice(&session.flags.to_be_bytes());
        encode_option_reply(out, option, ReplyType::INFO, &d);

        // "A server ... MAY refuse to go into transmission phase with a client ... which
        // uses NBD_OPT_GO without requesting NBD_INFO_BLOCK_SIZE"; QEMU only refuses
        // NBD_OPT_INFO, and tolerates every client on NBD_OPT_GO.
        if option == OptionCode::INFO && !block_size_requested && alignment > 1 {
            error_reply(
                out,
                option,
                ReplyType::ERR_BLOCK_SIZE_REQD,
                "request NBD_INFO_BLOCK_SIZE to use this export",
            );
            return Step::Continue;
        }
        encode_option_reply(out, option, ReplyType::ACK, &[]);
        if option == OptionCode::GO {
            Step::Go(session)
        } else {
            Step::Continue
        }
    }

    fn meta_context(
        &mut self,
        option: OptionCode,
        data: &[u8],
        exports: &(dyn ExportSource + Sync),
        out: &mut Vec<u8>,
    ) -> Step {
        let set = option == OptionCode::SET_META_CONTEXT;
        if set {
            // "Issuing this command replaces all previously-set metadata contexts
            // (including when this command fails)".
            self.contexts = None;
            // "This option MUST NOT be requested unless structured replies or extended
            // headers have been negotiated first. If a client attempts to do so, a server
            // SHOULD send NBD_REP_ERR_INVALID".
            if self.mode < Mode::Structured {
                error_reply(
                    out,
                    option,
                    ReplyType::ERR_INVALID,
                    "request option 'NBD_OPT_SET_META_CONTEXT' when structured reply is not negotiated",
                );
                return Step::Continue;
            }
        }
        let request = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                error_reply(out, option, ReplyType::ERR_INVALID, &e.to_string());
                return Step::Continue;
            }
        };
        let Some(export) = find_or_refuse(exports, &request.name, option, out) else {
            return Step::Continue;
        };
        let mode = if set { QueryMode::Set } else { QueryMode::List };
        let selected = meta::select(&export.contexts(), &request.queries, mode);
        for ctx in &selected {
            // "The metadata context ID in these replies is reserved and SHOULD be set to
            // zero" when listing.
            let id = if set { ctx.id() } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(ctx.name().as_bytes());
            encode_option_reply(out, option, ReplyType::META_CONTEXT, &d);
        }
        encode_option_reply(out, option, ReplyType::ACK, &[]);
        if set {
            self.contexts = Some((export.name.clone(), selected));
        }
        Step::Continue
    }
}

/// The export `name`, or `None` after answering `NBD_REP_ERR_UNKNOWN` to `option`.
fn find_or_refuse(
    exports: &(dyn ExportSource + Sync),
    name: &str,
    option: OptionCode,
    out: &mut Vec<u8>,
) -> Option<Arc<Export>> {
    let export = exports.find(name);
    if export.is_none() {
        error_reply(
            out,
            option,
            ReplyType::ERR_UNKNOWN,
            &format!("export '{}' not present", sanitize(name)),
        );
    }
    export
}

fn error_reply(out: &mut Vec<u8>, option: OptionCode, ty: ReplyType, message: &str) {
    let mut msg = message.as_bytes();
    if msg.len() > MAX_STRING_SIZE {
        msg = &msg[..MAX_STRING_SIZE];
    }
    encode_option_reply(out, option, ty, msg);
}

/// "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID".
fn reject_length(option: OptionCode, out: &mut Vec<u8>) -> Step {
    error_reply(
        out,
        option,
        ReplyType::ERR_INVALID,
        &format!("option '{option}' has unexpected length"),
    );
    Step::Continue
}

/// A name safe to echo in a message: at most 80 characters, control characters escaped.
fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .take(80)
        .flat_map(char::escape_default)
        .collect();
    if name.chars().count() > 80 {
        s.push_str("...");
    }
    s
}

/// Runs the handshake on `stream` until the client enters transmission; with `tls`, the
/// client must start TLS first, and the stream returned is the TLS stream.
pub(crate) async fn negotiate<S>(
    stream: S,
    exports: &(dyn ExportSource + Sync),
    tls: Option<&TlsConfig>,
) -> Result<(MaybeTls<S>, Session), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = MaybeTls::Plain(stream);
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&Negotiator::HANDSHAKE_FLAGS.to_be_bytes());
    stream
        .write_all(&greeting)
        .await
        .map_err(HandshakeError::Io)?;
    let client = stream.read_u32().await.map_err(HandshakeError::Io)?;
    let mut negotiator = Negotiator::new(client, tls.is_some())?;
    let mut data = Vec::new();
    let mut out = Vec::new();
    loop {
        let mut header = [0u8; OptionHeader::SIZE];
        stream
            .read_exact(&mut header)
            .await
            .map_err(HandshakeError::Io)?;
        let header = OptionHeader::decode(&header).map_err(HandshakeError::BadMagic)?;
        if header.length > OPTION_LENGTH_MAX {
            return Err(HandshakeError::OptionTooLong {
                option: header.option,
                length: header.length,
            });
        }
        let drain = header.length > OPTION_DATA_LIMIT || header.option.name().is_none();
        let option_data = if drain {
            drain_exact(&mut stream, header.length.into()).await?;
            OptionData::Drained
        } else {
            data.clear();
            data.resize(header.length as usize, 0);
            stream
                .read_exact(&mut data)
                .await
                .map_err(HandshakeError::Io)?;
            OptionData::Read(&data)
        };
        out.clear();
        let step = negotiator.on_option(header.option, option_data, exports, &mut out);
        if !out.is_empty() {
            let written = stream.write_all(&out).await;
            if !matches!(step, Step::Abort) {
                written.map_err(HandshakeError::Io)?;
            }
        }
        match step {
            Step::Continue => {}
            Step::Go(session) => {
                stream.flush().await.map_err(HandshakeError::Io)?;
                return Ok((stream, session));
            }
            Step::Abort => {
                // "the client SHOULD gracefully handle the server closing the connection".
                let _ = stream.flush().await;
                return Err(HandshakeError::Aborted);
            }
            Step::Disconnect(e) => return Err(e),
            Step::Fail(e) => {
                let _ = stream.flush().await;
                return Err(e);
            }
            Step::StartTls => {
                stream.flush().await.map_err(HandshakeError::Io)?;
                let (MaybeTls::Plain(plain), Some(tls)) = (stream, tls) else {
                    // The negotiator only asks for TLS when it is configured and not
                    // started yet.
                    return Err(HandshakeError::Tls(io::Error::other("TLS already started")));
                };
                stream = crate::tls::accept(plain, tls).await.map_err(|e| match e {
                    AcceptError::Handshake(e) => HandshakeError::Tls(e),
                    AcceptError::Unauthorized(reason) => HandshakeError::Unauthorized(reason),
                })?;
                negotiator.tls_started();
            }
        }
    }
}

/// Reads and discards `len` bytes without buffering them.
async fn drain_exact<S: AsyncRead + Unpin>(stream: &mut S, len: u64) -> Result<(), HandshakeError> {
    let copied = tokio::io::copy(&mut (&mut *stream).take(len), &mut tokio::io::sink())
        .await
        .map_err(HandshakeError::Io)?;
    if copied < len {
        return Err(HandshakeError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportConfig;
    use block_core::{BlockDriver, Node};

    #[derive(Debug)]
    struct Zeroes(u64);

    impl block_core::ImageFacts for Zeroes {
        fn driver_name(&self) -> &'static str {
            "zeroes"
        }
    }

    #[async_trait::async_trait]
    impl block_core::BlockIo for Zeroes {
        fn size(&self) -> u64 {
            self.0
        }

        fn read_only(&self) -> bool {
            false
        }

        async fn readv(&self, _offset: u64, buf: &block_core::SgList) -> block_core::Result<()> {
            buf.fill_zero(0, buf.len());
            Ok(())
        }

        async fn writev(
            &self,
            _offset: u64,
            _buf: &block_core::SgList,
            _flags: block_core::WriteFlags,
        ) -> block_core::Result<()> {
            Ok(())
        }

        async fn flush(&self) -> block_core::Result<()> {
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl BlockDriver for Zeroes {}

    struct Exports(Vec<Arc<Export>>);

    impl ExportSource for Exports {
        fn find(&self, name: &str) -> Option<Arc<Export>> {
            self.0.iter().find(|e| e.name == name).cloned()
        }
        fn all(&self) -> Vec<Arc<Export>> {
            self.0.clone()
        }
    }

    fn exports() -> Exports {
        let make = |name: &str, size: u64| {
            let node = Node::new(name, Arc::new(Zeroes(size)), Vec::new());
            Export::new(
                ExportConfig::new(name, node.attach("test", true).unwrap()),
                true,
            )
        };
        // 1000 bytes: exported as 512, QEMU's sector rounding.
        Exports(vec![make("a", 1 << 20), make("b", 1000)])
    }

    /// Splits encoded option replies into (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, ReplyType, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(out[..8], proto::OPTION_REPLY_MAGIC.to_be_bytes());
            let opt = u32::from_be_bytes(out[8..12].try_into().unwrap());
            let ty = ReplyType(u32::from_be_bytes(out[12..16].try_into().unwrap()));
            let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            v.push((opt, ty, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    fn opt(
        n: &mut Negotiator,
        ex: &Exports,
        code: OptionCode,
        data: &[u8],
    ) -> (Step, Vec<(u32, ReplyType, Vec<u8>)>) {
        let mut out = Vec::new();
        let step = n.on_option(code, OptionData::Read(data), ex, &mut out);
        (step, replies(&out))
    }

    fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        MetaContextRequest {
            name: name.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        }
        .encode(&mut d);
        d
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        InfoRequest {
            name: name.into(),
            requests: vec![],
        }
        .encode(&mut d);
        d
    }

    #[test]
    fn client_flags() {
        assert!(matches!(
            Negotiator::new(4, false),
            Err(HandshakeError::UnknownClientFlags(4))
        ));
        let n = Negotiator::new(3, false).unwrap();
        assert_eq!(n.mode, Mode::Simple);
        assert!(n.no_zeroes);
        assert_eq!(Negotiator::new(0, false).unwrap().mode, Mode::ExportName);
    }

    #[test]
    fn non_fixed_newstyle_only_allows_export_name() {
        let ex = exports();
        let mut n = Negotiator::new(0, false).unwrap();
        let (step, r) = opt(&mut n, &ex, OptionCode::LIST, &[]);
        assert!(matches!(
            step,
            Step::Disconnect(HandshakeError::NotFixedNewstyle(_))
        ));
        assert!(r.is_empty());
        let mut out = Vec::new();
        let step = n.on_option(
            OptionCode::EXPORT_NAME,
            OptionData::Read(b"b"),
            &ex,
            &mut out,
        );
        let Step::Go(session) = step else {
            panic!("no go")
        };
        assert_eq!(session.size, 512);
        // Size, flags, 124 zeroes (no NO_ZEROES).
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(out[..8], 512u64.to_be_bytes());
    }

    #[test]
    fn structured_and_extended_negotiation() {
        let ex = exports();
        let mut n = Negotiator::new(3, false).unwrap();
        let (_, r) = opt(&mut n, &ex, OptionCode::STRUCTURED_REPLY, b"x");
        assert_eq!(r[0].1, ReplyType::ERR_INVALID);
        let (_, r) = opt(&mut n, &ex, OptionCode::STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].1, ReplyType::ACK);
        let (_, r) = opt(&mut n, &ex, OptionCode::STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].1, ReplyType::ERR_INVALID);
        let (_, r) = opt(&mut n, &ex, OptionCode::EXTENDED_HEADERS, &[]);
        assert_eq!(r[0].1, ReplyType::ACK);
        let (_, r) = opt(&mut n, &ex, OptionCode::EXTENDED_HEADERS, &[]);
        assert_eq!(r[0].1, ReplyType::ERR_INVALID);
        let (_, r) = opt(&mut n, &ex, OptionCode::STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].1, ReplyType::ERR_EXT_HEADER_REQD);
        let (step, _) = opt(&mut n, &ex, OptionCode::EXPORT_NAME, b"a");
        assert!(matches!(
            step,
            Step::Disconnect(HandshakeError::ExportNameRefused(_))
        ));
    }

    #[test]
    fn meta_contexts_follow_the_export_name() {
        let ex = exports();
        let mut n = Negotiator::new(3, false).unwrap();
        // Listing works before structured replies; ids are zero.
        let (_, r) = opt(&mut n, &ex, OptionCode::LIST_META_CONTEXT, &meta("a", &[]));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, ReplyType::META_CONTEXT);
        assert_eq!(&r[0].2[..4], &[0, 0, 0, 0]);
        assert_eq!(&r[0].2[4..], b"base:allocation");
        assert_eq!(r[1].1, ReplyType::ACK);
        let (_, r) = opt(
            &mut n,
            &ex,
            OptionCode::SET_META_CONTEXT,
            &meta("a", &["base:allocation"]),
        );
        assert_eq!(r[0].1, ReplyType::ERR_INVALID);
        opt(&mut n, &ex, OptionCode::STRUCTURED_REPLY, &[]);
        let (_, r) = opt(
            &mut n,
            &ex,
            OptionCode::SET_META_CONTEXT,
            &meta("zz", &["base:allocation"]),
        );
        assert_eq!(r[0].1, ReplyType::ERR_UNKNOWN);
        let (_, r) = opt(
            &mut n,
            &ex,
            OptionCode::SET_META_CONTEXT,
            &meta("a", &["base:allocation"]),
        );
        assert_eq!(r[0].1, ReplyType::META_CONTEXT);
        // With extended headers, NBD_OPT_INFO shows BLOCK_STAT_PAYLOAD (as QEMU does);
        // NBD_OPT_GO only once contexts are selected for the export.
        let mut e = Negotiator::new(3, false).unwrap();
        opt(&mut e, &ex, OptionCode::EXTENDED_HEADERS, &[]);
        let export_flags = |r: &[(u32, ReplyType, Vec<u8>)]| {
            let info = r
                .iter()
                .find(|x| x.1 == ReplyType::INFO && x.2[..2] == [0, 0])
                .unwrap();
            u16::from_be_bytes([info.2[10], info.2[11]])
        };
        let (_, r) = opt(&mut e, &ex, OptionCode::INFO, &go("a"));
        assert_ne!(
            export_flags(&r) & proto::transmission_flags::BLOCK_STAT_PAYLOAD,
            0
        );
        let (_, r) = opt(&mut e, &ex, OptionCode::GO, &go("a"));
        assert_eq!(
            export_flags(&r) & proto::transmission_flags::BLOCK_STAT_PAYLOAD,
            0
        );
        // GO to another export: no contexts.
        let (step, r) = opt(&mut n, &ex, OptionCode::GO, &go("b"));
        assert_eq!(r.last().unwrap().1, ReplyType::ACK);
        let Step::Go(session) = step else {
            panic!("no go")
        };
        assert!(session.contexts.is_empty());
        assert_eq!(session.mode, Mode::Structured);
        assert_ne!(session.flags & proto::transmission_flags::SEND_DF, 0);
        // GO to the same export: base:allocation.
        let mut n = Negotiator::new(3, false).unwrap();
        opt(&mut n, &ex, OptionCode::STRUCTURED_REPLY, &[]);
        opt(
            &mut n,
            &ex,
            OptionCode::SET_META_CONTEXT,
            &meta("a", &["base:allocation"]),
        );
        let (step, _) = opt(&mut n, &ex, OptionCode::GO, &go("a"));
        let Step::Go(session) = step else {
            panic!("no go")
        };
        assert_eq!(session.contexts, vec![MetaContext::BaseAllocation]);
        // A failing SET clears the earlier selection.
        let mut n = Negotiator::new(3, false).unwrap();
        opt(&mut n, &ex, OptionCode::STRUCTURED_REPLY, &[]);
        opt(
            &mut n,
            &ex,
            OptionCode::SET_META_CONTEXT,
            &meta("a", &["base:allocation"]),
        );
        let (_, r) = opt(&mut n, &ex, OptionCode::SET_META_CONTEXT, &[0, 0, 0]);
        assert_eq!(r[0].1, ReplyType::ERR_INVALID);
        let (step, _) = opt(&mut n, &ex, OptionCode::GO, &go("a"));
        let Step::Go(session) = step else {
            panic!("no go")
        };
        assert!(session.contexts.is_empty());
    }

    #[test]
    fn info_replies_and_drained_options() {
        let ex = exports();
        let mut n = Negotiator::new(3, false).unwrap();
        let mut d = Vec::new();
        InfoRequest {
            name: "a".into(),
            requests: vec![InfoType::NAME, InfoType::DESCRIPTION, InfoType(77)],
        }
        .encode(&mut d);
        let (step, r) = opt(&mut n, &ex, OptionCode::INFO, &d);
        assert!(matches!(step, Step::Continue));
        let types: Vec<u16> = r
            .iter()
            .filter(|x| x.1 == ReplyType::INFO)
            .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
            .collect();
        // NAME, BLOCK_SIZE, EXPORT (no description: none set; unknown type ignored).
        assert_eq!(types, vec![1, 3, 0]);
        assert_eq!(r.last().unwrap().1, ReplyType::ACK);
        let mut out = Vec::new();
        let step = n.on_option(OptionCode::EXPORT_NAME, OptionData::Drained, &ex, &mut out);
        assert!(matches!(step, Step::Disconnect(_)));
        let step = n.on_option(OptionCode(99), OptionData::Drained, &ex, &mut out);
        assert!(matches!(step, Step::Continue));
        assert_eq!(replies(&out)[0].1, ReplyType::ERR_UNSUP);
        let (step, r) = opt(&mut n, &ex, OptionCode::ABORT, b"ignored");
        assert!(matches!(step, Step::Abort));
        assert_eq!(r[0].1, ReplyType::ACK);
    }

    #[test]
    fn forced_tls() {
        let ex = exports();
        let mut n = Negotiator::new(3, true).unwrap();
        // Everything but STARTTLS and ABORT is refused before TLS, unknown options included.
        for code in [
            OptionCode::LIST,
            OptionCode::GO,
            OptionCode::INFO,
            OptionCode::STRUCTURED_REPLY,
            OptionCode(99),
        ] {
            let (step, r) = opt(&mut n, &ex, code, &go("a"));
            assert!(matches!(step, Step::Continue));
            assert_eq!(r.len(), 1);
            assert_eq!((r[0].0, r[0].1), (code.0, ReplyType::ERR_TLS_REQD));
        }
        let mut out = Vec::new();
        let step = n.on_option(OptionCode::LIST, OptionData::Drained, &ex, &mut out);
        assert!(matches!(step, Step::Continue));
        assert_eq!(replies(&out)[0].1, ReplyType::ERR_TLS_REQD);
        // EXPORT_NAME cannot be refused with a reply: the connection ends.
        let (step, r) = opt(&mut n, &ex, OptionCode::EXPORT_NAME, b"a");
        assert!(matches!(
            step,
            Step::Disconnect(HandshakeError::TlsRequired(_))
        ));
        assert!(r.is_empty());
        // STARTTLS with data: an error, then the end (as QEMU).
        let (step, r) = opt(&mut n, &ex, OptionCode::STARTTLS, b"x");
        assert!(matches!(step, Step::Fail(HandshakeError::StartTlsData)));
        assert_eq!(r[0].1, ReplyType::ERR_INVALID);
        // ABORT is acknowledged.
        let (step, r) = opt(&mut n, &ex, OptionCode::ABORT, &[]);
        assert!(matches!(step, Step::Abort));
        assert_eq!(r[0].1, ReplyType::ACK);
        // STARTTLS: ACK, then the driver runs the TLS handshake.
        let mut n = Negotiator::new(3, true).unwrap();
        let (step, r) = opt(&mut n, &ex, OptionCode::STARTTLS, &[]);
        assert!(matches!(step, Step::StartTls));
        assert_eq!(r[0].1, ReplyType::ACK);
        n.tls_started();
        let (_, r) = opt(&mut n, &ex, OptionCode::STARTTLS, &[]);
        assert_eq!(r[0].1, ReplyType::ERR_INVALID);
        let (_, r) = opt(&mut n, &ex, OptionCode::LIST, &[]);
        assert_eq!(r.last().unwrap().1, ReplyType::ACK);
        let mut out = Vec::new();
        let step = n.on_option(
            OptionCode::EXPORT_NAME,
            OptionData::Read(b"a"),
            &ex,
            &mut out,
        );
        assert!(matches!(step, Step::Go(_)));
    }

    #[test]
    fn starttls_forgets_earlier_negotiation() {
        let ex = exports();
        // A client may negotiate nothing before STARTTLS in FORCEDTLS mode; the state a
        // plain negotiation could have built is reset all the same.
        let mut n = Negotiator::new(3, false).unwrap();
        opt(&mut n, &ex, OptionCode::EXTENDED_HEADERS, &[]);
        opt(
            &mut n,
            &ex,
            OptionCode::SET_META_CONTEXT,
            &meta("a", &["base:allocation"]),
        );
        n.tls_started();
        let (step, _) = opt(&mut n, &ex, OptionCode::GO, &go("a"));
        let Step::Go(session) = step else {
            panic!("no go")
        };
        assert_eq!(session.mode, Mode::Simple);
        assert!(session.contexts.is_empty());
    }

    #[test]
    fn starttls_without_tls_is_policy() {
        let ex = exports();
        let mut n = Negotiator::new(3, false).unwrap();
        let (step, r) = opt(&mut n, &ex, OptionCode::STARTTLS, &[]);
        assert!(matches!(step, Step::Continue));
        assert_eq!(r[0].1, ReplyType::ERR_POLICY);
    }

    proptest::proptest! {
        /// Any sequence of options, with any data, gives replies or an end, never a panic;
        /// every reply is well formed and answers the option asked.
        #[test]
        fn any_option_sequence(
            client in 0u32..4,
            options in proptest::collection::vec((0u32..14, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), proptest::prelude::any::<bool>()), 0..12),
        ) {
            let ex = exports();
            let Ok(mut n) = Negotiator::new(client, false) else { return Ok(()) };
            for (code, data, drained) in options {
                let mut out = Vec::new();
                let d = if drained { OptionData::Drained } else { OptionData::Read(&data) };
                let step = n.on_option(OptionCode(code), d, &ex, &mut out);
                if code != OptionCode::EXPORT_NAME.0 || !matches!(step, Step::Go(_)) {
                    for (opt, _, _) in replies(&out) {
                        proptest::prop_assert_eq!(opt, code);
                    }
                }
                if !matches!(step, Step::Continue) {
                    break;
                }
            }
        }
    }
}
