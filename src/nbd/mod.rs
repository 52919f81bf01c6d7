//! An NBD server: exports one [`ExportDevice`] to QEMU (and any other NBD
//! client) over a Unix socket or, when asked, TCP (with TLS).
//!
//! What it speaks (NBD `doc/proto.md`): fixed newstyle negotiation with
//! `NBD_OPT_GO`/`NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME` and
//! `NBD_OPT_ABORT`, and `NBD_OPT_STARTTLS` when [`Server::tls`] requires
//! TLS (then nothing else is answered before it); every other option is
//! answered `NBD_REP_ERR_UNSUP`, so
//! QEMU 10 (which asks for extended headers and structured replies first)
//! falls back to simple replies. Commands: READ, WRITE, FLUSH, TRIM,
//! WRITE_ZEROES and DISC, with the FUA flag. Transmission flags advertise
//! `SEND_FLUSH` and `SEND_FUA` (QEMU silently skips flushes otherwise),
//! `SEND_TRIM` and `SEND_WRITE_ZEROES`, never `CAN_MULTI_CONN`.
//!
//! Durability: a FLUSH is answered only after every request received before
//! it has completed and [`ExportDevice::flush`] has returned; a command with
//! FUA is answered only after the device call with `fua = true` returned.
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
    /// Makes every write that completed before this call durable.
    fn flush(&self) -> crate::Result<()>;
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
