//! The NBD wire format, continued: structured replies, metadata contexts
//! and block status, and the block-size information, for both sides.
//!
//! Pure code, like [`super::proto`]: every `parse_*` takes bytes and never
//! panics, whatever they hold (a fuzz target drives them). The client
//! (`storage::nbd`) parses what a remote server sends with these; a server
//! encodes with the same functions, so the two sides cannot disagree.
//! NBD `doc/proto.md`, "Structured reply chunk message" and "Metadata
//! querying".

// NBD is big-endian by specification.
#![allow(clippy::big_endian_bytes)]

use super::proto::{ProtoError, be16, be32, be64, parse_name};

/// Starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Chunk flag: the last chunk of its reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Chunk type: no payload; ends a reply that carries nothing else.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: u64 offset, then data read at that offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: u64 offset, u32 length: that range reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: u32 context id, then (u32 length, u32 flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: u32 error, u16 message length, message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Chunk type: as `ERROR`, then the u64 offset the error is about.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Option reply type: a metadata context id and name.
pub const REP_META_CONTEXT: u32 = 4;
/// Command: block status of a range, per selected metadata context.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// The allocation metadata context every server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The fixed part of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub handle: u64,
    /// Bytes of payload that follow.
    pub length: u32,
}

impl ChunkHeader {
    /// Whether this chunk ends its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// Whether the type is an error (bit 15): an unknown one of these only
    /// fails its request; an unknown non-error type breaks the connection.
    pub fn is_error(&self) -> bool {
        self.kind & (1 << 15) != 0
    }
}

/// What a reply begins with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply (16-byte header).
    Simple,
    /// A structured reply chunk (20-byte header).
    Structured,
}

/// Tells a simple reply from a structured chunk by its first four bytes.
pub fn reply_kind(magic: &[u8; 4]) -> Result<ReplyKind, ProtoError> {
    match u32::from_be_bytes(*magic) {
        super::proto::SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        other => Err(ProtoError::BadMagic {
            what: "reply",
            found: u64::from(other),
        }),
    }
}

/// Encodes a chunk header.
pub fn encode_chunk_header(header: &ChunkHeader) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut out = [0u8; STRUCTURED_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&header.flags.to_be_bytes());
    out[6..8].copy_from_slice(&header.kind.to_be_bytes());
    out[8..16].copy_from_slice(&header.handle.to_be_bytes());
    out[16..20].copy_from_slice(&header.length.to_be_bytes());
    out
}

/// Decodes a chunk header.
pub fn parse_chunk_header(bytes: &[u8; STRUCTURED_HEADER_LEN]) -> Result<ChunkHeader, ProtoError> {
    let magic = be32(bytes, 0);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "structured reply",
            found: u64::from(magic),
        });
    }
    Ok(ChunkHeader {
        flags: be16(bytes, 4),
        kind: be16(bytes, 6),
        handle: be64(bytes, 8),
        length: be32(bytes, 16),
    })
}

/// The offset an `OFFSET_DATA` payload starts with; the data follows it.
pub fn parse_offset_data(payload: &[u8]) -> Result<(u64, &[u8]), ProtoError> {
    // The spec requires at least one byte of data.
    if payload.len() < 9 {
        return Err(ProtoError::Truncated {
            what: "NBD_REPLY_TYPE_OFFSET_DATA",
        });
    }
    Ok((be64(payload, 0), &payload[8..]))
}

/// Bytes before the data of a final `OFFSET_DATA` chunk: its header and
/// the offset.
pub const OFFSET_DATA_PREFIX_LEN: usize = STRUCTURED_HEADER_LEN + 8;

/// The header and offset of a final `OFFSET_DATA` chunk carrying `len`
/// bytes read at `offset`; the data follows them.
pub fn encode_offset_data_prefix(
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; OFFSET_DATA_PREFIX_LEN] {
    let mut out = [0u8; OFFSET_DATA_PREFIX_LEN];
    out[..STRUCTURED_HEADER_LEN].copy_from_slice(&encode_chunk_header(&ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_OFFSET_DATA,
        handle,
        length: len + 8,
    }));
    out[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// Decodes an `OFFSET_HOLE` payload: offset and length.
pub fn parse_offset_hole(payload: &[u8]) -> Result<(u64, u32), ProtoError> {
    exact(payload, 12, "NBD_REPLY_TYPE_OFFSET_HOLE")?;
    Ok((be64(payload, 0), be32(payload, 8)))
}

/// Encodes an `OFFSET_HOLE` payload.
pub fn encode_offset_hole(offset: u64, length: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..8].copy_from_slice(&offset.to_be_bytes());
    out[8..12].copy_from_slice(&length.to_be_bytes());
    out
}

/// An error chunk, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    /// The NBD error number.
    pub error: u32,
    /// The server's message (lossily decoded; for logs only).
    pub message: String,
    /// For `ERROR_OFFSET`, the offset the error is about.
    pub offset: Option<u64>,
}

/// Decodes an `ERROR` or `ERROR_OFFSET` payload.
pub fn parse_error_chunk(kind: u16, payload: &[u8]) -> Result<ChunkError, ProtoError> {
    const WHAT: &str = "NBD_REPLY_TYPE_ERROR";
    if payload.len() < 6 {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    let error = be32(payload, 0);
    let len = usize::from(be16(payload, 4));
    let rest = &payload[6..];
    if rest.len() < len {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    let message = String::from_utf8_lossy(&rest[..len]).into_owned();
    let tail = &rest[len..];
    let offset = match (kind, tail.len()) {
        (REPLY_TYPE_ERROR_OFFSET, 8) => Some(be64(tail, 0)),
        (REPLY_TYPE_ERROR_OFFSET, n) if n < 8 => {
            return Err(ProtoError::Truncated { what: WHAT });
        }
        // Unknown error types may carry more; only ERROR is exact.
        (REPLY_TYPE_ERROR, 0) => None,
        (REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET, _) => {
            return Err(ProtoError::TrailingBytes { what: WHAT });
        }
        _ => None,
    };
    Ok(ChunkError {
        error,
        message,
        offset,
    })
}

/// Encodes an `ERROR` payload.
pub fn encode_error_chunk(error: u32, message: &str) -> Vec<u8> {
    // A string in NBD is at most 4096 bytes; cut at a character boundary.
    let mut cut = message.len().min(super::proto::MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message.as_bytes()[..cut];
    let mut out = Vec::with_capacity(6 + message.len());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// One block-status extent: `length` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes this extent covers.
    pub length: u32,
    /// Context flags (`STATE_*` for `base:allocation`).
    pub flags: u32,
}

/// The information type an `NBD_REP_INFO` reply's data starts with.
pub fn info_type(data: &[u8]) -> Option<u16> {
    data.first_chunk::<2>().map(|b| u16::from_be_bytes(*b))
}

/// Decodes a `BLOCK_STATUS` payload: the context id and its extents (at
/// least one, each of a non-zero length).
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<Extent>), ProtoError> {
    const WHAT: &str = "NBD_REPLY_TYPE_BLOCK_STATUS";
    if payload.len() < 12 {
        return Err(ProtoError::Truncated { what: WHAT });
    }
    if !(payload.len() - 4).is_multiple_of(8) {
        return Err(ProtoError::TrailingBytes { what: WHAT });
    }
    let id = be32(payload, 0);
    let extents = payload[4..]
        .chunks_exact(8)
        .map(|e| Extent {
            length: be32(e, 0),
            flags: be32(e, 4),
        })
        .collect::<Vec<_>>();
    if extents.iter().any(|e| e.length == 0) {
        return Err(ProtoError::Truncated {
            what: "block status extent",
        });
    }
    Ok((id, extents))
}

/// Encodes a `BLOCK_STATUS` payload.
pub fn encode_block_status(id: u32, extents: &[Extent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * extents.len());
    out.extend_from_slice(&id.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
    out
}

/// The data of `NBD_OPT_SET_META_CONTEXT` / `LIST_META_CONTEXT`: the
/// export and the queries.
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// Queries one `LIST_META_CONTEXT` / `SET_META_CONTEXT` may carry: a
/// server knows few contexts, and each query costs a reply.
pub const MAX_META_QUERIES: usize = 128;

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `SET_META_CONTEXT`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (none: every context, for LIST).
    pub queries: Vec<String>,
}

/// Decodes the data of `NBD_OPT_LIST_META_CONTEXT` / `SET_META_CONTEXT`:
/// the export name and the queries, each a length-prefixed string.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    const WHAT: &str = "meta context request";
    let mut rest = data;
    let string = |rest: &mut &[u8]| -> Result<String, ProtoError> {
        let Some(len) = rest.first_chunk::<4>() else {
            return Err(ProtoError::Truncated { what: WHAT });
        };
        let len = u32::from_be_bytes(*len) as usize;
        let body = &rest[4..];
        if len > body.len() {
            return Err(ProtoError::Truncated { what: WHAT });
        }
        let parsed = parse_name(&body[..len])?;
        *rest = &body[len..];
        Ok(parsed)
    };
    let export = string(&mut rest)?;
    let Some(count) = rest.first_chunk::<4>() else {
        return Err(ProtoError::Truncated { what: WHAT });
    };
    let count = u32::from_be_bytes(*count) as usize;
    rest = &rest[4..];
    if count > MAX_META_QUERIES {
        return Err(ProtoError::TooBig {
            what: "meta context queries",
            len: count as u64,
            max: MAX_META_QUERIES as u64,
        });
    }
    let queries = (0..count)
        .map(|_| string(&mut rest))
        .collect::<Result<Vec<_>, _>>()?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes { what: WHAT });
    }
    Ok(MetaContextRequest { export, queries })
}

/// Encodes the data of an `NBD_REP_META_CONTEXT` reply.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Decodes the data of an `NBD_REP_META_CONTEXT` reply: id and name.
pub fn parse_rep_meta_context(data: &[u8]) -> Result<(u32, String), ProtoError> {
    if data.len() < 4 {
        return Err(ProtoError::Truncated {
            what: "NBD_REP_META_CONTEXT",
        });
    }
    Ok((be32(data, 0), parse_name(&data[4..])?))
}

/// The server's block-size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Offsets and lengths must be multiples of this.
    pub minimum: u32,
    /// Requests should be multiples of this.
    pub preferred: u32,
    /// The largest payload of a request.
    pub maximum: u32,
}

/// Decodes `NBD_INFO_BLOCK_SIZE` data, checking what the spec requires of
/// the values (powers of two, minimum at most 64 KiB, an ordered triple).
pub fn parse_info_block_size(data: &[u8]) -> Result<BlockSizes, ProtoError> {
    const WHAT: &str = "NBD_INFO_BLOCK_SIZE";
    exact(data, 14, WHAT)?;
    if be16(data, 0) != super::proto::INFO_BLOCK_SIZE {
        return Err(ProtoError::BadMagic {
            what: "info type",
            found: u64::from(be16(data, 0)),
        });
    }
    let sizes = BlockSizes {
        minimum: be32(data, 2),
        preferred: be32(data, 6),
        maximum: be32(data, 10),
    };
    let sane = sizes.minimum.is_power_of_two()
        && sizes.minimum <= 64 << 10
        && sizes.preferred.is_power_of_two()
        && sizes.preferred >= sizes.minimum
        && sizes.maximum >= sizes.minimum;
    if !sane {
        return Err(ProtoError::TooBig {
            what: "block size constraint",
            len: u64::from(sizes.minimum),
            max: u64::from(sizes.maximum),
        });
    }
    Ok(sizes)
}

fn exact(data: &[u8], len: usize, what: &'static str) -> Result<(), ProtoError> {
    match data.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(ProtoError::Truncated { what }),
        std::cmp::Ordering::Greater => Err(ProtoError::TrailingBytes { what }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_headers_round_trip_and_tell_replies_apart() {
        let header = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_ERROR_OFFSET,
            handle: 0x0102_0304_0506_0708,
            length: 0xdead_beef,
        };
        let bytes = encode_chunk_header(&header);
        assert_eq!(parse_chunk_header(&bytes), Ok(header));
        assert!(header.done() && header.is_error());
        let magic: [u8; 4] = bytes[..4].try_into().unwrap();
        assert_eq!(reply_kind(&magic), Ok(ReplyKind::Structured));
        assert_eq!(
            reply_kind(&super::super::proto::SIMPLE_REPLY_MAGIC.to_be_bytes()),
            Ok(ReplyKind::Simple)
        );
        assert!(reply_kind(&[1, 2, 3, 4]).is_err());
    }

    #[test]
    fn payloads_round_trip_and_reject_bad_lengths() {
        let extents = [
            Extent {
                length: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            },
            Extent {
                length: 1 << 20,
                flags: 0,
            },
        ];
        let status = encode_block_status(7, &extents);
        assert_eq!(parse_block_status(&status), Ok((7, extents.to_vec())));
        assert!(parse_block_status(&status[..status.len() - 1]).is_err());
        assert!(parse_block_status(&status[..4]).is_err());
        let zero_length = encode_block_status(
            7,
            &[Extent {
                length: 0,
                flags: 0,
            }],
        );
        assert!(parse_block_status(&zero_length).is_err());

        let error = encode_error_chunk(28, "no space");
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR, &error),
            Ok(ChunkError {
                error: 28,
                message: "no space".into(),
                offset: None
            })
        );
        let mut with_offset = error.clone();
        with_offset.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &with_offset).map(|e| e.offset),
            Ok(Some(9))
        );
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &with_offset).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &error[..7]).is_err());

        assert_eq!(
            parse_offset_hole(&encode_offset_hole(1 << 40, 512)),
            Ok((1 << 40, 512))
        );
        assert!(parse_offset_data(&[0; 8]).is_err());
        assert_eq!(
            parse_offset_data(&[0, 0, 0, 0, 0, 0, 0, 3, 9]),
            Ok((3, &[9u8][..]))
        );

        let request = encode_meta_context_request("disk0", &[BASE_ALLOCATION, "qemu:dirty"]);
        assert_eq!(
            parse_meta_context_request(&request),
            Ok(MetaContextRequest {
                export: "disk0".into(),
                queries: vec![BASE_ALLOCATION.into(), "qemu:dirty".into()],
            })
        );
        for cut in 0..request.len() {
            assert!(
                parse_meta_context_request(&request[..cut]).is_err(),
                "{cut}"
            );
        }
        let mut longer = request.clone();
        longer.push(0);
        assert!(parse_meta_context_request(&longer).is_err());
        let mut many = encode_meta_context_request("", &[]);
        many[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&many).is_err());

        let context = encode_rep_meta_context(3, BASE_ALLOCATION);
        assert_eq!(
            parse_rep_meta_context(&context),
            Ok((3, BASE_ALLOCATION.to_string()))
        );
    }

    #[test]
    fn block_sizes_are_checked() {
        let ok = super::super::proto::encode_info_block_size(512, 4096, 32 << 20);
        assert_eq!(
            parse_info_block_size(&ok),
            Ok(BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 32 << 20
            })
        );
        for (min, pref, max) in [
            (3, 4096, 1 << 20),
            (512, 256, 1 << 20),
            (1 << 17, 1 << 17, 1 << 20),
            (4096, 4096, 512),
        ] {
            let bad = super::super::proto::encode_info_block_size(min, pref, max);
            assert!(parse_info_block_size(&bad).is_err(), "{min} {pref} {max}");
        }
        assert!(parse_info_block_size(&ok[..13]).is_err());
    }
}
