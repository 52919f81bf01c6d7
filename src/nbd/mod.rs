//! An NBD server: exports one [`ExportDevice`] to QEMU (and any other NBD
//! client) over a Unix socket or, when asked, TCP (with TLS).
//!
//! What it speaks (NBD `doc/proto.md`): fixed newstyle negotiation with
//! `NBD_OPT_GO`/`NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT` (the one context is
//! `base:allocation`), and `NBD_OPT_STARTTLS` when [`Server::tls`] requires
//! TLS (then nothing else is answered before it); every other option
//! (extended headers) is answered `NBD_REP_ERR_UNSUP`. Commands: READ,
//! WRITE, FLUSH, TRIM, WRITE_ZEROES (with `FAST_ZERO`), BLOCK_STATUS and
//! DISC, with the FUA flag. With structured replies a READ is answered
//! with one data chunk (so `DF` always holds), BLOCK_STATUS with one
//! extent list, and errors with an error chunk and a message. Transmission
//! flags advertise `SEND_FLUSH` and `SEND_FUA` (QEMU silently skips
//! flushes otherwise), `SEND_TRIM`, `SEND_WRITE_ZEROES`,
//! `SEND_FAST_ZERO` and `CAN_MULTI_CONN`; block sizes come from
//! [`ExportDevice::block_size`].
//!
//! Durability: a FLUSH is answered only after every request received before
//! it on its connection has completed and [`ExportDevice::flush`] has
//! returned; a command with FUA is answered only after the device call
//! with `fua = true` returned. Multi-conn: every connection's writes go to
//! the same device, and a device's flush covers every write that completed
//! before it, so a flush covers all the writes whose replies a client had
//! received on any connection when it sent the flush (the spec asks no
//! more of `CAN_MULTI_CONN`).
//!
//! - [`proto`]: the wire format, pure.
//! - [`server`]: sockets, the handshake, the request pipeline.
//! - [`tls`]: NBD_OPT_STARTTLS's credentials, rustls configurations and
//!   the TLS stream both ends use.
//! - [`structured`]: structured replies, block status and block sizes,
//!   pure; what the client in `storage::nbd` parses.

pub mod proto;
pub mod server;
mod stream;
pub mod structured;
pub mod tls;

pub use server::{Server, ServerHandle, Stats, bind_tcp, bind_unix};
pub use stream::{Stream, write_all_vectored};

use crate::error::{Error, ErrorKind};

/// What an export serves. Every call may come from several threads at once
/// (up to 16 requests in flight per connection); the server checks ranges
/// against [`size`](ExportDevice::size) before calling.
pub trait ExportDevice: Send + Sync + 'static {
    /// Size in bytes; fixed for the life of the export.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()>;
    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> crate::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros; with `fua`, durably.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> crate::Result<()>;
    /// Discards `len` bytes at `offset` (advisory; contents become
    /// unspecified).
    fn trim(&self, offset: u64, len: u64) -> crate::Result<()>;
    /// Makes every write that completed before this call durable, whichever
    /// connection made it: the server advertises `CAN_MULTI_CONN`, so a
    /// client may write on one connection and flush on another.
    fn flush(&self) -> crate::Result<()>;
    /// The unit requests should be aligned to, a power of two: a block
    /// device's logical block size. Unaligned requests still work.
    fn block_size(&self) -> u32 {
        1
    }
    /// Whether `write_zeroes` is certainly faster than writing zeros (it
    /// never falls back to writing them). When it is not, a WRITE_ZEROES
    /// with `FAST_ZERO` fails at once with `ENOTSUP`, as the spec asks.
    fn zeroes_fast(&self) -> bool {
        false
    }
    /// How `len` bytes at `offset` are allocated, from `offset` on, in at
    /// most `max` extents (the rest may be left out): holes that read as
    /// zeros and data. The default knows nothing sparse: all data.
    fn allocation(&self, offset: u64, len: u32, max: usize) -> crate::Result<Vec<Allocation>> {
        let _ = (offset, max);
        Ok(vec![Allocation {
            length: len,
            hole: false,
        }])
    }
}

/// `extents` (from `offset`) with every edge inside them on a multiple of
/// `block`, the minimum block size the server advertised (the spec asks it
/// of block status): a hole keeps only the whole blocks it covers, its
/// partial blocks join the data around it (calling zeros data is always
/// true). The range's own ends stay where the client put them.
pub fn align_allocation(offset: u64, extents: &[Allocation], block: u64) -> Vec<Allocation> {
    let end = offset + extents.iter().map(|e| u64::from(e.length)).sum::<u64>();
    let mut out: Vec<Allocation> = Vec::new();
    let mut push = |length: u64, hole: bool| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.hole == hole => last.length += length as u32,
            _ => out.push(Allocation {
                length: length as u32,
                hole,
            }),
        }
    };
    let mut at = offset;
    for e in extents {
        let next = at + u64::from(e.length);
        if e.hole {
            let first = if at == offset {
                at
            } else {
                at.div_ceil(block) * block
            };
            let last = if next == end {
                next
            } else {
                next / block * block
            };
            if first < last {
                push(first - at, false);
                push(last - first, true);
                push(next - last, false);
            } else {
                push(next - at, false);
            }
        } else {
            push(next - at, false);
        }
        at = next;
    }
    out
}

/// One extent of [`ExportDevice::allocation`]: `length` bytes, a hole
/// (unallocated, reading as zeros) or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Bytes, never 0.
    pub length: u32,
    /// Unallocated, and reads as zeros.
    pub hole: bool,
}

/// The extents of `offset..offset + len` (at most `max`) from a storage's
/// `next_data`: gaps between data ranges are holes that read as zeros.
pub fn allocation_from(
    offset: u64,
    len: u32,
    max: usize,
    mut next_data: impl FnMut(u64) -> crate::Result<Option<std::ops::Range<u64>>>,
) -> crate::Result<Vec<Allocation>> {
    let end = offset + u64::from(len);
    let max = max.max(1);
    let mut out: Vec<Allocation> = Vec::new();
    // Within `len`, so it fits; neighbours of one kind are merged.
    let push = |out: &mut Vec<Allocation>, length: u64, hole: bool| match out.last_mut() {
        Some(last) if last.hole == hole => last.length += length as u32,
        _ => out.push(Allocation {
            length: length as u32,
            hole,
        }),
    };
    let mut at = offset;
    // One extent past `max`, so that the last one kept is whole.
    while at < end && out.len() <= max {
        let data = match next_data(at)? {
            None => end..end,
            Some(r) if r.start >= end => end..end,
            // A range that ends before `at` breaks the contract: calling it
            // data is always true, a hole might not be.
            Some(r) if r.end <= at => at..end,
            Some(r) => r.start.max(at)..r.end.min(end),
        };
        if data.start > at {
            push(&mut out, data.start - at, true);
        }
        if !data.is_empty() {
            push(&mut out, data.end - data.start, false);
        }
        at = data.end;
    }
    out.truncate(max);
    Ok(out)
}

/// The NBD error number a device error is reported as.
///
/// `InvalidInput` is `EINVAL`; an I/O error whose cause is ENOSPC, EDQUOT or
/// EFBIG is `ENOSPC`; everything else, including `Poisoned` (the device
/// refuses all further work, which to the guest is a failing disk), is
/// `EIO`.
pub fn errno_for(error: &Error) -> u32 {
    match error.kind() {
        ErrorKind::InvalidInput => proto::EINVAL,
        ErrorKind::Io => match error {
            Error::Io { source, .. } => match source.raw_os_error() {
                // ENOSPC, EFBIG, EDQUOT (Linux numbers).
                Some(28 | 27 | 122) => proto::ENOSPC,
                _ if source.kind() == std::io::ErrorKind::StorageFull => proto::ENOSPC,
                _ => proto::EIO,
            },
            _ => proto::EIO,
        },
        _ => proto::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn aligned_allocation_keeps_holes_only_on_whole_blocks() {
        let mut cases = 0;
        for bits in 0u32..(1 << 12) {
            // A 12-unit map, units of 256 bytes, blocks of 1 KiB.
            let map: Vec<bool> = (0..12).map(|i| bits & (1 << i) != 0).collect();
            for (offset, len) in [(0u64, 12u32), (1, 10), (4, 8), (3, 1)] {
                let mut extents: Vec<Allocation> = Vec::new();
                for &data in &map[offset as usize..(offset + u64::from(len)) as usize] {
                    match extents.last_mut() {
                        Some(last) if last.hole != data => last.length += 256,
                        _ => extents.push(Allocation {
                            length: 256,
                            hole: !data,
                        }),
                    }
                }
                let start = offset * 256;
                let aligned = align_allocation(start, &extents, 1024);
                let total: u32 = aligned.iter().map(|e| e.length).sum();
                assert_eq!(total, len * 256, "{map:?} {offset}+{len}: {aligned:?}");
                let mut at = start;
                for (i, e) in aligned.iter().enumerate() {
                    assert!(e.length > 0);
                    if i > 0 {
                        assert_eq!(
                            at % 1024,
                            0,
                            "{map:?} {offset}+{len}: edge {at} in {aligned:?}"
                        );
                    }
                    if e.hole {
                        for unit in at / 256..(at + u64::from(e.length)) / 256 {
                            assert!(!map[unit as usize], "{map:?}: data called a hole");
                        }
                    }
                    at += u64::from(e.length);
                }
                cases += 1;
            }
        }
        println!("align_allocation: {cases} cases");
    }

    /// `allocation_from` against a byte map of the image (true: data).
    fn check(map: &[bool], offset: u64, len: u32, max: usize) {
        let next_data = |at: u64| -> crate::Result<Option<std::ops::Range<u64>>> {
            let Some(start) = (at as usize..map.len()).find(|&i| map[i]) else {
                return Ok(None);
            };
            let end = (start..map.len()).find(|&i| !map[i]).unwrap_or(map.len());
            Ok(Some(start as u64..end as u64))
        };
        let got = allocation_from(offset, len, max, next_data).unwrap();
        let mut want: Vec<Allocation> = Vec::new();
        for &data in &map[offset as usize..(offset + u64::from(len)) as usize] {
            match want.last_mut() {
                Some(last) if last.hole != data => last.length += 1,
                _ => want.push(Allocation {
                    length: 1,
                    hole: !data,
                }),
            }
        }
        want.truncate(max.max(1));
        assert_eq!(got, want, "{offset}+{len} max {max} of {map:?}");
    }

    #[test]
    fn allocation_follows_the_data_ranges() {
        let mut cases = 0;
        for bits in 0u32..256 {
            let map: Vec<bool> = (0..8).map(|i| bits & (1 << i) != 0).collect();
            for offset in 0..8u64 {
                for len in 1..=(8 - offset) as u32 {
                    for max in [1, 2, 3, 16] {
                        check(&map, offset, len, max);
                        cases += 1;
                    }
                }
            }
        }
        println!("allocation_from: {cases} cases");
    }

    #[test]
    fn error_numbers() {
        assert_eq!(errno_for(&Error::InvalidInput("x".into())), proto::EINVAL);
        for (raw, want) in [
            (28, proto::ENOSPC),
            (122, proto::ENOSPC),
            (27, proto::ENOSPC),
            (5, proto::EIO),
            (2, proto::EIO),
        ] {
            let e = Error::io("pwrite", io::Error::from_raw_os_error(raw));
            assert_eq!(errno_for(&e), want, "errno {raw}");
        }
        let full = Error::io("pwrite", io::Error::from(io::ErrorKind::StorageFull));
        assert_eq!(errno_for(&full), proto::ENOSPC);
        assert_eq!(errno_for(&Error::Poisoned { what: "engine" }), proto::EIO);
        assert_eq!(errno_for(&Error::Corrupt("x".into())), proto::EIO);
    }
}
