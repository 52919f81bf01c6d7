//! A connected NBD socket, Unix or TCP, possibly under TLS: what the
//! server accepts and what the client in `storage::nbd` dials.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::tls::TlsStream;

/// A connected socket of either family.
pub enum Stream {
    /// A Unix-domain socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
    /// A TLS session over either (after NBD_OPT_STARTTLS).
    Tls(TlsStream),
}

impl Stream {
    /// Who is at the other end, for the event log: a TCP peer's address,
    /// a Unix peer's uid.
    pub fn peer(&self) -> String {
        match self {
            Stream::Unix(s) => match crate::socket::peer_uid(s) {
                Ok(uid) => format!("unix uid {uid}"),
                Err(_) => "unix".into(),
            },
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Stream::Tls(_) => "tls".into(),
        }
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.clone()),
        })
    }

    /// Shuts both directions down: a reader blocked on it returns.
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(s) => s.raw().shutdown(),
        }
    }

    /// Whether TLS protects it.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Ends a TLS session cleanly (close_notify), best effort; nothing for
    /// a plain socket.
    pub fn close_notify(&self) {
        if let Stream::Tls(s) = self {
            s.close_notify();
        }
    }

    /// `O_NONBLOCK` on or off.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Tls(s) => s.raw().set_nonblocking(on),
        }
    }

    /// The socket's descriptor; `None` under TLS (whose records are not
    /// the caller's bytes).
    pub fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            Stream::Unix(s) => Some(s.as_fd()),
            Stream::Tcp(s) => Some(s.as_fd()),
            Stream::Tls(_) => None,
        }
    }

    /// `SO_RCVTIMEO`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Tls(s) => s.raw().set_read_timeout(timeout),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

/// Writes every byte of `parts`, in as few system calls (and, under TLS,
/// records) as the stream allows: a request's header and payload leave
/// together instead of as a lone 28-byte segment and then the rest.
pub fn write_all_vectored(
    writer: &mut impl Write,
    mut parts: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        match writer.write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}
