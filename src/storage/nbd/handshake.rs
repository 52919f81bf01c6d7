//! Dialling an export and negotiating a connection: fixed newstyle,
//! STARTTLS first for `nbds`, structured replies and `base:allocation`,
//! then GO with block sizes.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use super::conn::{Connection, Ledger};
use super::{ExportInfo, MAX_PAYLOAD, NbdOptions};
use crate::error::{Error, Result};
use crate::nbd::Stream;
use crate::nbd::proto::{self, ProtoError};
use crate::nbd::structured::{self as st, BlockSizes};
use crate::nbd::tls::{self, TlsStream};
use crate::storage::location::{Endpoint, NbdAddress};
use rustls_pki_types::ServerName;

/// The TLS configuration and server name an `nbds` address needs; `None`
/// for a plain one. Loaded once per storage: every connection and
/// reconnection uses the same credentials.
pub(super) fn client_tls(
    address: &NbdAddress,
    options: &NbdOptions,
) -> Result<Option<ClientTarget>> {
    if !address.tls {
        return Ok(None);
    }
    let dir = address
        .tls_certificates
        .as_ref()
        .or(options.tls_creds.as_ref())
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "{address}: nbds needs TLS credentials: --tls-creds DIR or \
                 ?tls-certificates=DIR (ca-cert.pem, client-cert.pem, client-key.pem)"
            ))
        })?;
    let config = tls::client_config(dir)?;
    let host = match (&address.tls_hostname, &address.endpoint) {
        (Some(name), _) => name.as_str(),
        (None, Endpoint::Tcp { host, .. }) => host.as_str(),
        // What QEMU and libnbd would need spelled out; the usual name of
        // a certificate for a server on this host.
        (None, Endpoint::Unix { .. }) => "localhost",
    };
    let name =
        tls::server_name(host).map_err(|e| Error::InvalidInput(format!("{address}: {e}")))?;
    Ok(Some(ClientTarget { config, name }))
}

/// What a TLS connection to one export is checked against.
#[derive(Debug, Clone)]
pub(crate) struct ClientTarget {
    config: tls::ClientTls,
    name: ServerName<'static>,
}

/// Dials `address` and negotiates within `timeout`: one connection ready
/// for requests, its reader thread running. With `tls`, STARTTLS comes
/// first and nothing else is said in plain text.
pub(super) fn open(
    address: &NbdAddress,
    tls: Option<&ClientTarget>,
    writable: bool,
    timeout: Duration,
    ledger: &Arc<Ledger>,
) -> Result<Connection> {
    let what = |e: io::Error| Error::InvalidInput(format!("{address}: {e}"));
    let mut stream = dial(&address.endpoint, timeout).map_err(|e| Error::Io {
        op: "connect to the NBD server",
        path: None,
        source: io::Error::new(e.kind(), format!("{address}: {e}")),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(what)?;
    greet(&mut stream).map_err(what)?;
    if let Some(target) = tls {
        start_tls(&mut stream).map_err(what)?;
        stream = Stream::Tls(
            TlsStream::connect(stream, &target.config, target.name.clone()).map_err(what)?,
        );
    }
    let tls_suite = match &stream {
        Stream::Tls(session) => session.cipher_suite(),
        _ => None,
    };
    let mut reader = stream.try_clone().map_err(what)?;
    let mut writer = stream;
    let mut info = handshake(&mut reader, &mut writer, &address.export)
        .map_err(|e| match tls {
            // Under TLS 1.3 the server checks our certificate after our
            // side of the handshake is done; GnuTLS servers then just
            // hang up, so the first read is where a refusal shows.
            Some(target)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                io::Error::new(
                    e.kind(),
                    if target.config.presents_certificate() {
                        format!(
                            "the server closed the connection after the TLS handshake: it \
                             may have refused our client certificate ({})",
                            target.config.dir().join(tls::CLIENT_CERT).display()
                        )
                    } else {
                        format!(
                            "the server closed the connection after the TLS handshake: it \
                             may require a client certificate, and {} has no {}",
                            target.config.dir().display(),
                            tls::CLIENT_CERT
                        )
                    },
                )
            }
            _ => e,
        })
        .map_err(what)?;
    if let Some(suite) = &tls_suite {
        tracing::debug!("{address}: TLS session, {suite}");
    }
    info.tls_suite = tls_suite;
    reader.set_read_timeout(None).map_err(what)?;
    if writable && info.has(proto::TFLAG_READ_ONLY) {
        return Err(Error::InvalidInput(format!(
            "{address}: the export is read-only"
        )));
    }
    if writable && !info.has(proto::TFLAG_SEND_FLUSH) {
        return Err(Error::InvalidInput(format!(
            "{address}: the export does not take FLUSH, so no write to it could be \
             made durable"
        )));
    }
    Connection::start(reader, writer, info, Arc::clone(ledger)).map_err(what)
}

pub(super) fn dial(endpoint: &Endpoint, timeout: Duration) -> io::Result<Stream> {
    match endpoint {
        Endpoint::Unix { socket } => UnixStream::connect(socket).map(Stream::Unix),
        Endpoint::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        // Requests are small and latency-bound.
                        s.set_nodelay(true)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

/// Why the handshake failed, for the message.
pub(super) fn proto_error(e: ProtoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

pub(super) fn read_exact_vec(reader: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf)?;
    Ok(buf)
}

/// One option's replies: `on_reply` sees every reply that is not the final
/// ACK or an error; the error replies come back as `Err` with the
/// server's message.
pub(super) fn option(
    reader: &mut impl Read,
    writer: &mut impl Write,
    option: u32,
    data: &[u8],
    mut on_reply: impl FnMut(u32, &[u8]) -> io::Result<()>,
) -> io::Result<std::result::Result<(), (u32, String)>> {
    writer.write_all(&proto::encode_option(option, data))?;
    loop {
        let header =
            proto::parse_option_reply_header(&proto::read_array(reader)?).map_err(proto_error)?;
        if header.option != option {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a reply to option {} while {option} was asked",
                    header.option
                ),
            ));
        }
        if header.length as usize > proto::MAX_STRING + 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an option reply of {} bytes", header.length),
            ));
        }
        let body = read_exact_vec(reader, header.length as usize)?;
        match header.reply {
            proto::REP_ACK => return Ok(Ok(())),
            r if r & proto::REP_ERR != 0 => {
                return Ok(Err((r, String::from_utf8_lossy(&body).into_owned())));
            }
            r => on_reply(r, &body)?,
        }
    }
}

pub(super) fn refused(what: &str, error: (u32, String)) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, refused_text(what, error))
}

pub(super) fn refused_text(what: &str, (code, message): (u32, String)) -> String {
    let reason = match code {
        proto::REP_ERR_UNSUP => "not supported".to_string(),
        proto::REP_ERR_POLICY => "refused by policy".to_string(),
        proto::REP_ERR_UNKNOWN => "no such export".to_string(),
        proto::REP_ERR_TLS_REQD => "the server requires TLS (use nbds://)".to_string(),
        proto::REP_ERR_BLOCK_SIZE_REQD => "the server requires block sizes".to_string(),
        proto::REP_ERR_SHUTDOWN => "the server is shutting down".to_string(),
        c => format!("error {:#x}", c),
    };
    let message = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    format!("{what}: {reason}{message}")
}

/// The greeting and our flags: fixed newstyle, which STARTTLS needs too.
pub(super) fn greet(stream: &mut Stream) -> io::Result<()> {
    let flags = proto::parse_greeting(&proto::read_array(stream)?).map_err(proto_error)?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the server does not speak fixed newstyle NBD",
        ));
    }
    let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
    let client_flags = proto::FLAG_C_FIXED_NEWSTYLE
        | if no_zeroes {
            proto::FLAG_C_NO_ZEROES
        } else {
            0
        };
    stream.write_all(&proto::encode_client_flags(client_flags))
}

/// NBD_OPT_STARTTLS, the first option: anything but an ACK ends the
/// connection, never a fall back to plain text (which a man in the
/// middle could force by answering for the server).
pub(super) fn start_tls(stream: &mut Stream) -> io::Result<()> {
    let refused = |why: String| {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{why}; refusing to go on without TLS"),
        )
    };
    let mut reader = stream.try_clone()?;
    match option(&mut reader, stream, proto::OPT_STARTTLS, &[], |r, _| {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an unexpected reply {r:#x} to STARTTLS"),
        ))
    }) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(refused(refused_text("the server refused STARTTLS", e))),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Err(refused(format!(
                "the server closed the connection at STARTTLS ({e})"
            )))
        }
        Err(e) => Err(e),
    }
}

/// Structured replies and `base:allocation` when offered, then GO with a
/// block-size request (which commits us to the sizes).
pub(super) fn handshake(
    reader: &mut impl Read,
    writer: &mut impl Write,
    export: &str,
) -> io::Result<ExportInfo> {
    let structured = option(reader, writer, proto::OPT_STRUCTURED_REPLY, &[], |_, _| {
        Ok(())
    })?
    .is_ok();
    let mut allocation = None;
    if structured {
        let request = st::encode_meta_context_request(export, &[st::BASE_ALLOCATION]);
        let outcome = option(
            reader,
            writer,
            proto::OPT_SET_META_CONTEXT,
            &request,
            |r, body| {
                if r == st::REP_META_CONTEXT {
                    let (id, name) = st::parse_rep_meta_context(body).map_err(proto_error)?;
                    if name == st::BASE_ALLOCATION {
                        allocation = Some(id);
                    }
                }
                Ok(())
            },
        )?;
        if outcome.is_err() {
            allocation = None;
        }
    }

    let request =
        proto::encode_info_request(export, &[proto::INFO_BLOCK_SIZE]).map_err(proto_error)?;
    let mut export_info = None;
    let mut block = None;
    let outcome = option(reader, writer, proto::OPT_GO, &request, |r, body| {
        if r != proto::REP_INFO {
            return Ok(());
        }
        match st::info_type(body) {
            Some(proto::INFO_EXPORT) => {
                export_info = Some(proto::parse_info_export(body).map_err(proto_error)?)
            }
            Some(proto::INFO_BLOCK_SIZE) => {
                block = Some(st::parse_info_block_size(body).map_err(proto_error)?)
            }
            // Unknown information is to be ignored.
            _ => {}
        }
        Ok(())
    })?;
    outcome.map_err(|e| refused(&format!("export {export:?}"), e))?;
    let (size, flags) = export_info.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "GO succeeded without NBD_INFO_EXPORT",
        )
    })?;
    let block = block.unwrap_or(BlockSizes {
        // What the spec tells a client to assume when the server is silent.
        minimum: 1,
        preferred: proto::PREFERRED_BLOCK,
        maximum: MAX_PAYLOAD,
    });
    Ok(ExportInfo {
        size,
        flags,
        block,
        structured,
        allocation,
        tls_suite: None,
    })
}
