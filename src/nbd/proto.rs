//! The NBD wire format: constants, and encode/decode of the handshake, the
//! options and their replies, requests and simple replies.
//!
//! Pure code: the `parse_*` and `encode_*` functions work on byte slices and
//! never panic, whatever the input (they are fuzz targets). The two `read_*`
//! functions pull one message from a [`Read`] with explicit size limits, so a
//! hostile length never turns into an allocation. Everything on the wire is
//! big-endian (NBD `doc/proto.md`, "Conventions").
//!
//! Fixed newstyle negotiation and simple replies are here; structured
//! replies, metadata contexts and block sizes are in [`super::structured`];
//! no extended headers; STARTTLS's option number only (TLS itself is in
//! `tls`).

// NBD is big-endian by specification; the crate denies big-endian byte
// conversions elsewhere because the journal is little-endian.
#![allow(clippy::big_endian_bytes)]

use std::io::{self, Read};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows [`NBDMAGIC`] in the greeting and starts every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the flags field is valid (always set).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server handles `NBD_CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server honours `NBD_CMD_FLAG_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server handles `NBD_CMD_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server handles `NBD_CMD_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: flushes on one connection cover all connections.
/// This server never sets it.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: READ takes `CMD_FLAG_DF` (structured replies only).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: WRITE_ZEROES takes `CMD_FLAG_FAST_ZERO`.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: choose an export and enter transmission (old clients).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client is leaving.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS (the server with `Server::tls`, and `nbds` clients).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (not supported here).
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts (not supported here).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: set metadata contexts (not supported here).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (not supported here).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// The bit every option error reply has.
pub const REP_ERR: u32 = 1 << 31;
/// Option error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// Option error: the option data is malformed.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// Option error: the option needs TLS first (STARTTLS).
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// Option error: the server needs the client to accept block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
/// Option error: no export by that name.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// Option error: the option (or its reply) is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: the export name.
pub const INFO_NAME: u16 = 1;
/// Information type: the export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (a payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (write zeroes): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (read): do not fragment (structured replies only).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (block status): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (write zeroes): fail fast if zeroing is slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Error: operation not permitted (a write to a read-only export).
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument (bad range, flag or command).
pub const EINVAL: u32 = 22;
/// Error: no space left (a write past the end).
pub const ENOSPC: u32 = 28;
/// Error: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// Error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The longest string the spec allows (export names).
pub const MAX_STRING: usize = 4096;
/// Smallest block size we report.
pub const MIN_BLOCK: u32 = 1;
/// Preferred block size we report.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload we accept (the spec's default, 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Bytes of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Zero bytes after an `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A magic number is wrong.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What arrived instead.
        found: u64,
    },
    /// The client set flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The message ends before its fields do.
    #[error("{what} is truncated")]
    Truncated {
        /// Which message.
        what: &'static str,
    },
    /// The message has bytes after its last field.
    #[error("{what} has trailing bytes")]
    TrailingBytes {
        /// Which message.
        what: &'static str,
    },
    /// A declared length is over the limit.
    #[error("{what} length {len} exceeds {max}")]
    TooBig {
        /// Which length.
        what: &'static str,
        /// The declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// An export name is not UTF-8 or contains NUL.
    #[error("export name is not a valid NBD string")]
    BadName,
}

/// The client flags, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// The client asked to omit the zero padding.
    pub no_zeroes: bool,
}

/// The fixed part of an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number.
    pub option: u32,
    /// Bytes of option data that follow.
    pub length: u32,
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export the client asks about.
    pub name: String,
    /// The information types it asks for.
    pub requests: Vec<u16>,
}

/// One option, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(super::structured::MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(super::structured::MetaContextRequest),
    /// Any other option; the server answers `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

/// The fixed part of an option reply (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// The reply type (`REP_*`).
    pub reply: u32,
    /// Bytes of reply data that follow.
    pub length: u32,
}

/// A request's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// A command this server does not implement.
    Other(u16),
}

impl Command {
    /// The command for a wire type.
    pub fn from_code(code: u16) -> Command {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            super::structured::CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Other(other),
        }
    }

    /// The wire type.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => super::structured::CMD_BLOCK_STATUS,
            Command::Other(code) => code,
        }
    }

    /// The command flags this server accepts with this command.
    ///
    /// FUA is accepted on every command: the spec says a server that
    /// advertised SEND_FUA MUST accept it on any command, even if it only
    /// ignores it, and clients set it on reads and flushes (where a flush
    /// already is all FUA could ask for).
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::Write | Command::Trim | Command::Flush | Command::Disc => CMD_FLAG_FUA,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            // A read is never fragmented, so DF always holds; REQ_ONE is
            // for BLOCK_STATUS, but old clients set it on reads, harmlessly.
            Command::Read => CMD_FLAG_FUA | CMD_FLAG_DF | CMD_FLAG_REQ_ONE,
            Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            Command::Other(_) => 0,
        }
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (the payload length for a write).
    pub length: u32,
}

impl Request {
    /// Whether the FUA flag is set.
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or one of the `E*` error numbers.
    pub error: u32,
    /// The request's cookie.
    pub handle: u64,
}

/// Failure to read one message: the stream failed, or it carried garbage.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed or ended.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The bytes violate the protocol; the connection cannot continue.
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

/// A WRITE payload as [`read_request`] left it.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload {
    /// The command carries no payload.
    None,
    /// The payload, read in full.
    Data(Vec<u8>),
    /// The payload was over the limit and was read and thrown away.
    Discarded,
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags
/// `FIXED_NEWSTYLE | NO_ZEROES`.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Decodes a greeting (client side): the handshake flags.
pub fn parse_greeting(bytes: &[u8; GREETING_LEN]) -> Result<u16, ProtoError> {
    let magic = be64(bytes, 0);
    if magic != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "NBDMAGIC",
            found: magic,
        });
    }
    let opt = be64(bytes, 8);
    if opt != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "IHAVEOPT",
            found: opt,
        });
    }
    Ok(be16(bytes, 16))
}

/// Encodes client flags (client side).
pub fn encode_client_flags(flags: u32) -> [u8; 4] {
    flags.to_be_bytes()
}

/// Decodes the client flags; unknown bits are an error (the spec says the
/// server must then close the connection).
pub fn parse_client_flags(bytes: &[u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = be32(bytes, 0);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Encodes an option with its data (client side).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Decodes an option header.
pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be64(bytes, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: be32(bytes, 8),
        length: be32(bytes, 12),
    })
}

pub(crate) fn parse_name(bytes: &[u8]) -> Result<String, ProtoError> {
    if bytes.len() > MAX_STRING {
        return Err(ProtoError::TooBig {
            what: "export name",
            len: bytes.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    if bytes.contains(&0) {
        return Err(ProtoError::BadName);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::BadName)
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    const WHAT: &str = "info request";
    if data.len() < 4 {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    let name_len = be32(data, 0) as usize;
    let rest = &data[4..];
    if name_len > rest.len() {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    let name = parse_name(&rest[..name_len])?;
    let rest = &rest[name_len..];
    if rest.len() < 2 {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    let count = usize::from(be16(rest, 0));
    let rest = &rest[2..];
    if rest.len() < count * 2 {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    if rest.len() > count * 2 {
        return Err(ProtoError::TrailingBytes { what: WHAT });
    }
    let requests = rest.chunks_exact(2).map(|c| be16(c, 0)).collect();
    Ok(InfoRequest { name, requests })
}

/// Decodes the data of option `option`. Options this server does not speak
/// decode to [`ClientOption::Unsupported`] whatever their data.
pub fn parse_option_data(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    match option {
        OPT_EXPORT_NAME => parse_name(data).map(ClientOption::ExportName),
        OPT_ABORT | OPT_LIST | OPT_STRUCTURED_REPLY if !data.is_empty() => {
            Err(ProtoError::TrailingBytes {
                what: match option {
                    OPT_ABORT => "NBD_OPT_ABORT",
                    OPT_LIST => "NBD_OPT_LIST",
                    _ => "NBD_OPT_STRUCTURED_REPLY",
                },
            })
        }
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => Ok(ClientOption::List),
        OPT_STRUCTURED_REPLY => Ok(ClientOption::StructuredReply),
        OPT_LIST_META_CONTEXT => {
            super::structured::parse_meta_context_request(data).map(ClientOption::ListMetaContext)
        }
        OPT_SET_META_CONTEXT => {
            super::structured::parse_meta_context_request(data).map(ClientOption::SetMetaContext)
        }
        OPT_INFO => parse_info_request(data).map(ClientOption::Info),
        OPT_GO => parse_info_request(data).map(ClientOption::Go),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// Decodes one whole option, header and data, which must be all of `bytes`.
pub fn parse_option(bytes: &[u8]) -> Result<ClientOption, ProtoError> {
    let Some(header) = bytes.first_chunk::<OPTION_HEADER_LEN>() else {
        return Err(ProtoError::Truncated { what: "option" });
    };
    let header = parse_option_header(header)?;
    let data = &bytes[OPTION_HEADER_LEN..];
    match (header.length as usize).cmp(&data.len()) {
        std::cmp::Ordering::Greater => Err(ProtoError::Truncated { what: "option" }),
        std::cmp::Ordering::Less => Err(ProtoError::TrailingBytes { what: "option" }),
        std::cmp::Ordering::Equal => parse_option_data(header.option, data),
    }
}

/// Encodes the data of `NBD_OPT_INFO`/`NBD_OPT_GO` (client side). Fails if
/// the name or the list is too long for the format.
pub fn encode_info_request(name: &str, requests: &[u16]) -> Result<Vec<u8>, ProtoError> {
    if name.len() > MAX_STRING {
        return Err(ProtoError::TooBig {
            what: "export name",
            len: name.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    let count = u16::try_from(requests.len()).map_err(|_| ProtoError::TooBig {
        what: "info requests",
        len: requests.len() as u64,
        max: u64::from(u16::MAX),
    })?;
    let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    Ok(out)
}

/// Encodes an option reply with its data.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Decodes an option reply header (client side).
pub fn parse_option_reply_header(
    bytes: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtoError> {
    let magic = be64(bytes, 0);
    if magic != OPT_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: be32(bytes, 8),
        reply: be32(bytes, 12),
        length: be32(bytes, 16),
    })
}

/// The data of an `NBD_REP_INFO` / `NBD_INFO_EXPORT` reply.
pub fn encode_info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// Decodes `NBD_INFO_EXPORT` data (client side): size and flags.
pub fn parse_info_export(data: &[u8]) -> Result<(u64, u16), ProtoError> {
    const WHAT: &str = "NBD_INFO_EXPORT";
    if data.len() < 12 {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    if data.len() > 12 {
        return Err(ProtoError::TrailingBytes { what: WHAT });
    }
    if be16(data, 0) != INFO_EXPORT {
        return Err(ProtoError::BadMagic {
            what: "info type",
            found: u64::from(be16(data, 0)),
        });
    }
    Ok((be64(data, 2), be16(data, 10)))
}

/// The data of an `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` reply.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// The data of an `NBD_REP_SERVER` reply: one export name.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Decodes `NBD_REP_SERVER` data (client side): the export name.
pub fn parse_rep_server(data: &[u8]) -> Result<String, ProtoError> {
    const WHAT: &str = "NBD_REP_SERVER";
    if data.len() < 4 {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    let len = be32(data, 0) as usize;
    if len > data.len() - 4 {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    // Anything after the name is a description; ignored.
    parse_name(&data[4..4 + len])
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and the 124 zero bytes
/// unless the client set `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(10 + EXPORT_NAME_PADDING, 0);
    }
    out
}

/// Decodes a request header. Only the magic can make it fail: unknown
/// commands and flags are the server's to answer with `EINVAL`.
pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = be32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            found: u64::from(magic),
        });
    }
    Ok(Request {
        flags: be16(bytes, 4),
        command: Command::from_code(be16(bytes, 6)),
        handle: be64(bytes, 8),
        offset: be64(bytes, 16),
        length: be32(bytes, 24),
    })
}

/// Encodes a request header (client side).
pub fn encode_request(request: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&request.flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.command.code().to_be_bytes());
    out[8..16].copy_from_slice(&request.handle.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset.to_be_bytes());
    out[24..28].copy_from_slice(&request.length.to_be_bytes());
    out
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// Decodes a simple reply header (client side).
pub fn parse_simple_reply(bytes: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, ProtoError> {
    let magic = be32(bytes, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "simple reply",
            found: u64::from(magic),
        });
    }
    Ok(SimpleReply {
        error: be32(bytes, 4),
        handle: be64(bytes, 8),
    })
}

/// Reads exactly `N` bytes.
pub fn read_array<const N: usize>(reader: &mut impl Read) -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    reader.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads and throws away `len` bytes, in small pieces.
pub fn discard(reader: &mut impl Read, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut reader.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(())
}

fn read_vec(reader: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; len];
    reader.read_exact(&mut data)?;
    Ok(data)
}

/// Reads the data of an option whose header is `header`. Data up to `keep`
/// bytes comes back; data up to `discard_limit` bytes is read and thrown
/// away (`None`: answer `NBD_REP_ERR_TOO_BIG`); a longer length is a
/// [`ProtoError::TooBig`] without reading it (drop the connection).
pub fn read_option_data(
    reader: &mut impl Read,
    header: &OptionHeader,
    keep: u32,
    discard_limit: u32,
) -> Result<Option<Vec<u8>>, ReadError> {
    if header.length <= keep {
        return Ok(Some(read_vec(reader, header.length as usize)?));
    }
    if header.length <= discard_limit {
        discard(reader, u64::from(header.length))?;
        return Ok(None);
    }
    Err(ProtoError::TooBig {
        what: "option",
        len: u64::from(header.length),
        max: u64::from(discard_limit),
    }
    .into())
}

/// Reads one option, header and data, with the limits of
/// [`read_option_data`].
pub fn read_option(
    reader: &mut impl Read,
    keep: u32,
    discard_limit: u32,
) -> Result<(OptionHeader, Option<Vec<u8>>), ReadError> {
    let header = parse_option_header(&read_array(reader)?)?;
    let data = read_option_data(reader, &header, keep, discard_limit)?;
    Ok((header, data))
}

/// Reads the payload that follows `request`: nothing unless it is a WRITE;
/// kept up to `max_payload` bytes, read and thrown away up to
/// `discard_limit` bytes, and a [`ProtoError::TooBig`] beyond (drop the
/// connection: the stream cannot be resynchronised without reading it).
pub fn read_payload(
    reader: &mut impl Read,
    request: &Request,
    max_payload: u32,
    discard_limit: u32,
) -> Result<Payload, ReadError> {
    if request.command != Command::Write {
        return Ok(Payload::None);
    }
    if request.length <= max_payload {
        return Ok(Payload::Data(read_vec(reader, request.length as usize)?));
    }
    if request.length <= discard_limit {
        discard(reader, u64::from(request.length))?;
        return Ok(Payload::Discarded);
    }
    Err(ProtoError::TooBig {
        what: "write payload",
        len: u64::from(request.length),
        max: u64::from(discard_limit),
    }
    .into())
}

/// Reads one request and its payload, with the limits of [`read_payload`].
pub fn read_request(
    reader: &mut impl Read,
    max_payload: u32,
    discard_limit: u32,
) -> Result<(Request, Payload), ReadError> {
    let request = parse_request(&read_array(reader)?)?;
    let payload = read_payload(reader, &request, max_payload, discard_limit)?;
    Ok((request, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let g = encode_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(parse_greeting(&g), Ok(3));
        let mut bad = g;
        bad[0] ^= 1;
        assert!(matches!(
            parse_greeting(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(&encode_client_flags(3)),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags(&encode_client_flags(1)),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: false
            })
        );
        assert_eq!(
            parse_client_flags(&encode_client_flags(4)),
            Err(ProtoError::UnknownClientFlags(4))
        );
        assert_eq!(
            parse_client_flags(&[0xff; 4]),
            Err(ProtoError::UnknownClientFlags(u32::MAX))
        );
    }

    #[test]
    fn option_round_trips() {
        let go = encode_info_request("vm1", &[INFO_BLOCK_SIZE, INFO_NAME]).unwrap();
        assert_eq!(
            parse_option(&encode_option(OPT_GO, &go)),
            Ok(ClientOption::Go(InfoRequest {
                name: "vm1".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }))
        );
        let info = encode_info_request("", &[]).unwrap();
        assert_eq!(
            parse_option(&encode_option(OPT_INFO, &info)),
            Ok(ClientOption::Info(InfoRequest {
                name: String::new(),
                requests: vec![]
            }))
        );
        assert_eq!(
            parse_option(&encode_option(OPT_EXPORT_NAME, b"disk")),
            Ok(ClientOption::ExportName("disk".into()))
        );
        assert_eq!(
            parse_option(&encode_option(OPT_LIST, b"")),
            Ok(ClientOption::List)
        );
        assert_eq!(
            parse_option(&encode_option(OPT_ABORT, b"")),
            Ok(ClientOption::Abort)
        );
        assert_eq!(
            parse_option(&encode_option(OPT_STRUCTURED_REPLY, b"")),
            Ok(ClientOption::StructuredReply)
        );
        assert!(parse_option(&encode_option(OPT_STRUCTURED_REPLY, b"x")).is_err());
        assert!(parse_option(&encode_option(OPT_SET_META_CONTEXT, b"whatever")).is_err());
        for opt in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, 12345] {
            assert_eq!(
                parse_option(&encode_option(opt, b"whatever")),
                Ok(ClientOption::Unsupported(opt))
            );
        }
    }

    #[test]
    fn option_garbage_is_rejected() {
        let mut bad = encode_option(OPT_LIST, b"");
        bad[7] ^= 0x10;
        assert!(matches!(
            parse_option(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
        assert_eq!(
            parse_option(&encode_option(OPT_LIST, b"x")),
            Err(ProtoError::TrailingBytes {
                what: "NBD_OPT_LIST"
            })
        );
        assert!(parse_option(&encode_option(OPT_ABORT, b"x")).is_err());
        assert_eq!(
            parse_option(&[0; 3]),
            Err(ProtoError::Truncated { what: "option" })
        );
        // Header says 10 bytes, 2 follow; then 2 declared, 3 follow.
        let mut short = encode_option(OPT_GO, &[0; 10]);
        short.truncate(OPTION_HEADER_LEN + 2);
        assert!(matches!(
            parse_option(&short),
            Err(ProtoError::Truncated { .. })
        ));
        let mut long = encode_option(OPT_LIST, b"");
        long.push(0);
        assert!(matches!(
            parse_option(&long),
            Err(ProtoError::TrailingBytes { .. })
        ));
        // Name length beyond the data, info count beyond the data, trailing
        // bytes after the info list, a NUL in the name, invalid UTF-8.
        let cases: [&[u8]; 6] = [
            &[0, 0, 0, 9, b'a', 0, 0],
            &[0, 0, 0, 0, 0, 2, 0, 3],
            &[0, 0, 0, 0, 0, 1, 0, 3, 0],
            &[0, 0, 0, 1, 0, 0, 0],
            &[0, 0, 0, 1, 0xff, 0, 0],
            &[0xff, 0xff, 0xff, 0xff],
        ];
        for data in cases {
            assert!(parse_option_data(OPT_GO, data).is_err(), "{data:?}");
            assert!(parse_option_data(OPT_INFO, data).is_err(), "{data:?}");
        }
        assert!(parse_option_data(OPT_GO, &[]).is_err());
        let long_name = vec![b'a'; MAX_STRING + 1];
        assert!(matches!(
            parse_option_data(OPT_EXPORT_NAME, &long_name),
            Err(ProtoError::TooBig { .. })
        ));
        assert!(encode_info_request(&"a".repeat(MAX_STRING + 1), &[]).is_err());
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes() {
        // A cheap deterministic sweep; the fuzzer does the rest.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
            }
            let _ = parse_option(&bytes);
            let _ = parse_option_data(next() as u32 % 12, &bytes);
            let _ = parse_rep_server(&bytes);
            let _ = parse_info_export(&bytes);
            let mut req = [0u8; REQUEST_LEN];
            for b in &mut req {
                *b = next() as u8;
            }
            let _ = parse_request(&req);
        }
    }

    #[test]
    fn option_reply_round_trip() {
        let reply = encode_option_reply(OPT_GO, REP_INFO, &encode_info_export(1 << 30, 0x6d));
        let header = parse_option_reply_header(reply[..20].try_into().unwrap()).unwrap();
        assert_eq!(
            header,
            OptionReplyHeader {
                option: OPT_GO,
                reply: REP_INFO,
                length: 12
            }
        );
        assert_eq!(parse_info_export(&reply[20..]), Ok((1 << 30, 0x6d)));
        assert!(parse_info_export(&reply[20..31]).is_err());
        assert_eq!(parse_rep_server(&encode_rep_server("vm")), Ok("vm".into()));
        assert!(parse_rep_server(&[0, 0, 0, 5, b'a']).is_err());
        assert_eq!(
            encode_info_block_size(1, 4096, MAX_PAYLOAD),
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
        );
        let mut bad = reply.clone();
        bad[0] = 1;
        assert!(parse_option_reply_header(bad[..20].try_into().unwrap()).is_err());
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(encode_export_name_reply(512, 0x6d, true).len(), 10);
        let padded = encode_export_name_reply(512, 0x6d, false);
        assert_eq!(padded.len(), 134);
        assert!(padded[10..].iter().all(|&b| b == 0));
        assert_eq!(&padded[..10], &[0, 0, 0, 0, 0, 0, 2, 0, 0, 0x6d]);
    }

    #[test]
    fn request_round_trip() {
        for command in [
            Command::Read,
            Command::Write,
            Command::Disc,
            Command::Flush,
            Command::Trim,
            Command::WriteZeroes,
            Command::BlockStatus,
            Command::Other(5),
            Command::Other(0xffff),
        ] {
            let request = Request {
                flags: CMD_FLAG_FUA,
                command,
                handle: 0x0102_0304_0506_0708,
                offset: u64::MAX - 5,
                length: 0xdead_beef,
            };
            let bytes = encode_request(&request);
            assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
            assert_eq!(parse_request(&bytes), Ok(request));
            assert_eq!(Command::from_code(command.code()), command);
        }
        let mut bad = encode_request(&Request {
            flags: 0,
            command: Command::Read,
            handle: 1,
            offset: 0,
            length: 1,
        });
        bad[3] = 0;
        assert!(matches!(
            parse_request(&bad),
            Err(ProtoError::BadMagic {
                what: "request",
                ..
            })
        ));
    }

    #[test]
    fn simple_reply_round_trip() {
        let bytes = encode_simple_reply(EINVAL, 42);
        assert_eq!(&bytes[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(
            parse_simple_reply(&bytes),
            Ok(SimpleReply {
                error: EINVAL,
                handle: 42
            })
        );
        let mut bad = bytes;
        bad[1] = 0;
        assert!(parse_simple_reply(&bad).is_err());
    }

    #[test]
    fn read_option_limits() {
        let mut stream = encode_option(OPT_GO, &[0; 100]);
        stream.extend(encode_option(OPT_LIST, b""));
        let mut r = &stream[..];
        // Over `keep`: discarded, and the next option is still in step.
        let (h, data) = read_option(&mut r, 50, 1000).unwrap();
        assert_eq!((h.option, h.length, data), (OPT_GO, 100, None));
        let (h, data) = read_option(&mut r, 50, 1000).unwrap();
        assert_eq!((h.option, data), (OPT_LIST, Some(vec![])));
        // Absurd: refused without reading.
        let huge = encode_option(OPT_GO, &[0; 100]);
        assert!(matches!(
            read_option(&mut &huge[..], 10, 50),
            Err(ReadError::Proto(ProtoError::TooBig { .. }))
        ));
        // Cut short.
        assert!(matches!(
            read_option(&mut &huge[..50], 1000, 1000),
            Err(ReadError::Io(_))
        ));
    }

    #[test]
    fn read_request_limits() {
        let write = |len: u32| {
            let mut v = encode_request(&Request {
                flags: 0,
                command: Command::Write,
                handle: 7,
                offset: 0,
                length: len,
            })
            .to_vec();
            v.extend(std::iter::repeat_n(0xaa, len as usize));
            v
        };
        let mut stream = write(4);
        stream.extend(write(20));
        stream.extend(write(3));
        let mut r = &stream[..];
        assert_eq!(
            read_request(&mut r, 10, 100).unwrap().1,
            Payload::Data(vec![0xaa; 4])
        );
        assert_eq!(read_request(&mut r, 10, 100).unwrap().1, Payload::Discarded);
        assert_eq!(
            read_request(&mut r, 10, 100).unwrap().1,
            Payload::Data(vec![0xaa; 3])
        );
        assert!(r.is_empty());
        assert!(matches!(
            read_request(&mut &write(200)[..], 10, 100),
            Err(ReadError::Proto(ProtoError::TooBig { .. }))
        ));
        let read = encode_request(&Request {
            flags: 0,
            command: Command::Read,
            handle: 7,
            offset: 0,
            length: u32::MAX,
        });
        assert_eq!(
            read_request(&mut &read[..], 10, 100).unwrap().1,
            Payload::None
        );
        assert!(matches!(
            read_request(&mut &write(5)[..20], 10, 100),
            Err(ReadError::Io(_))
        ));
    }
}
