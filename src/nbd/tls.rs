//! NBD over TLS: credentials in QEMU's directory layout, the rustls
//! configurations of both ends, and [`TlsStream`], a TLS session that one
//! thread reads while others write (the server's reader and its repliers,
//! the client's callers and its reply reader).
//!
//! Credentials (QEMU's `tls-creds-x509` layout, so that one directory
//! serves QEMU and livecopy alike):
//! - server: `server-cert.pem` (leaf first, then any intermediates),
//!   `server-key.pem`, and `ca-cert.pem`, which, when present, makes client
//!   certificates mandatory and checked against it (mutual TLS);
//! - client: `ca-cert.pem` (mandatory: the server is always verified), and
//!   `client-cert.pem` with `client-key.pem` when the server asks for a
//!   client certificate.
//!
//! A key file readable by group or others is refused: whoever reads it can
//! impersonate its owner. No key, nor anything read from one, is ever put
//! in an error message.
//!
//! rustls checks names against the certificate's subjectAltName only,
//! never the CN, so certificates need a SAN (DNS or IP address).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use rustls::{SignatureScheme, client::danger::HandshakeSignatureValid};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::Stream;
use crate::error::{Error, Result};

/// The CA certificate file in a credentials directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The client's certificate chain.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's private key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// One crypto provider for the whole crate, chosen explicitly: the process
/// default is unset when two providers are compiled in.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client's provider: the same suites, AES-128-GCM offered first
/// within each TLS version (1.3's suites still before 1.2's). GnuTLS
/// servers (qemu-nbd, qemu-storage-daemon, nbdkit) take the client's
/// order, and a migration's bytes are decrypted on the server's one I/O
/// thread: AES-128 does 10 rounds where AES-256 does 14. All are the
/// standard suites; nothing weaker is added or moved up.
fn client_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the rest keep rustls's order.
    provider.cipher_suites.sort_by_key(|suite| {
        let tls12 = !matches!(suite, rustls::SupportedCipherSuite::Tls13(_));
        let aes128 = suite
            .suite()
            .as_str()
            .is_some_and(|name| name.contains("AES_128_GCM"));
        (tls12, !aes128)
    });
    Arc::new(provider)
}

fn bad(path: &Path, why: impl fmt::Display) -> Error {
    Error::InvalidInput(format!("{}: {why}", path.display()))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(path, format!("cannot read certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Reads a private key, refusing a file group or others may read.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    // One open: the mode checked is the mode of the file parsed, whatever
    // happens to the path in between.
    let file = std::fs::File::open(path).map_err(|e| Error::io_at("open", path, e))?;
    let meta = file.metadata().map_err(|e| Error::io_at("stat", path, e))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(
            path,
            format!(
                "the private key is readable by others (mode {mode:04o}); \
                 chmod 600 it (or 400)"
            ),
        ));
    }
    // The parser's error names the PEM problem, never the key's bytes.
    PrivateKeyDer::from_pem_reader(std::io::BufReader::new(file))
        .map_err(|e| bad(path, format!("holds no usable PEM private key ({e})")))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for cert in certificates(path)? {
        store
            .add(cert)
            .map_err(|e| bad(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

fn rustls_error(path: &Path, e: rustls::Error) -> Error {
    bad(path, format!("refused by TLS: {e}"))
}

/// The server's TLS configuration from `dir`: its certificate and key, and
/// with `ca-cert.pem` present, client certificates required and verified
/// against that CA, then (when `authz` is not empty) required to name one
/// of `authz` in their subjectAltName.
///
/// Without `ca-cert.pem` any client that completes the TLS handshake may
/// use the export: the link is encrypted but clients are not
/// authenticated. [`ServerTls::authenticates_clients`] says which.
pub fn server_config(dir: &Path, authz: &[String]) -> Result<ServerTls> {
    let cert_path = dir.join(SERVER_CERT);
    let key_path = dir.join(SERVER_KEY);
    let certs = certificates(&cert_path)?;
    let key = private_key(&key_path)?;
    let ca_path = dir.join(CA_CERT);
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_error(dir, e))?;
    // Any entry by that name counts, a dangling symlink included: it must
    // load, or client authentication would quietly be off.
    let has_ca = match ca_path.symlink_metadata() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io_at("stat", &ca_path, e)),
    };
    if !has_ca && !authz.is_empty() {
        return Err(bad(
            dir,
            format!("--tls-authz needs {CA_CERT} to verify client certificates against"),
        ));
    }
    let builder = if has_ca {
        let inner = WebPkiClientVerifier::builder_with_provider(roots(&ca_path)?, provider())
            .build()
            .map_err(|e| bad(&ca_path, format!("cannot verify clients with it: {e}")))?;
        let names = authz
            .iter()
            .map(|n| {
                ServerName::try_from(n.as_str())
                    .map(|n| n.to_owned())
                    .map_err(|_| {
                        Error::InvalidInput(format!(
                            "--tls-authz {n:?} is not a DNS name or an IP address"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        builder.with_client_cert_verifier(Arc::new(Authz { inner, names }))
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| bad(&cert_path, format!("does not go with {SERVER_KEY}: {e}")))?;
    Ok(ServerTls {
        config: Arc::new(config),
        authenticates_clients: has_ca,
    })
}

/// A server's TLS configuration.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    authenticates_clients: bool,
}

impl ServerTls {
    /// Whether client certificates are required and verified.
    pub fn authenticates_clients(&self) -> bool {
        self.authenticates_clients
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the configuration: it holds the key.
        f.debug_struct("ServerTls")
            .field("authenticates_clients", &self.authenticates_clients)
            .finish()
    }
}

/// The client's TLS configuration from `dir`: the server verified against
/// `ca-cert.pem`; `client-cert.pem` and `client-key.pem` presented when
/// both exist.
pub fn client_config(dir: &Path) -> Result<ClientTls> {
    let ca_path = dir.join(CA_CERT);
    if !ca_path.exists() {
        return Err(bad(
            dir,
            format!("no {CA_CERT}: the server's certificate could not be verified"),
        ));
    }
    let roots = roots(&ca_path)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| bad(&ca_path, format!("cannot verify servers with it: {e}")))?;
    let builder = ClientConfig::builder_with_provider(client_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| rustls_error(dir, e))?
        .with_webpki_verifier(verifier);
    let cert_path = dir.join(CLIENT_CERT);
    let key_path = dir.join(CLIENT_KEY);
    let presents_certificate = cert_path.exists();
    let config = match (cert_path.exists(), key_path.exists()) {
        (true, true) => builder
            .with_client_auth_cert(certificates(&cert_path)?, private_key(&key_path)?)
            .map_err(|e| bad(&cert_path, format!("does not go with {CLIENT_KEY}: {e}")))?,
        (false, false) => builder.with_no_client_auth(),
        (true, false) => return Err(bad(dir, format!("{CLIENT_CERT} without {CLIENT_KEY}"))),
        (false, true) => return Err(bad(dir, format!("{CLIENT_KEY} without {CLIENT_CERT}"))),
    };
    Ok(ClientTls {
        config: Arc::new(config),
        dir: dir.to_path_buf(),
        presents_certificate,
    })
}

/// A client's TLS configuration.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    dir: PathBuf,
    presents_certificate: bool,
}

impl ClientTls {
    /// The directory the credentials came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a client certificate is offered to servers that ask.
    pub fn presents_certificate(&self) -> bool {
        self.presents_certificate
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").field("dir", &self.dir).finish()
    }
}

/// The name a server certificate must carry for `host`: an IP address
/// when `host` is one (checked against IP-address SANs), else a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host)
        .map(|n| n.to_owned())
        .map_err(|_| {
            Error::InvalidInput(format!(
                "{host:?} is neither a DNS name nor an IP address a certificate can name"
            ))
        })
}

/// Client certificates verified by webpki, then required to name one of
/// `names` (when there are any).
#[derive(Debug)]
struct Authz {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for Authz {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.names.is_empty() {
            return Ok(verified);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if self.names.iter().any(|n| names_exactly(&cert, n)) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether `cert` names `name` itself, not through a wildcard: webpki's
/// check is a client's check of a server, where `*.corp.example` stands
/// for `client.corp.example`; an allow-list of client names means those
/// names exactly. A DNS name is therefore also tried with its first label
/// replaced by one no certificate names: a certificate valid for that too
/// matches through a wildcard, and is refused.
fn names_exactly(cert: &webpki::EndEntityCert<'_>, name: &ServerName<'_>) -> bool {
    if cert.verify_is_valid_for_subject_name(name).is_err() {
        return false;
    }
    let ServerName::DnsName(dns) = name else {
        return true;
    };
    let Some((_, rest)) = dns.as_ref().split_once('.') else {
        return true;
    };
    match ServerName::try_from(format!("livecopy-authz-probe-0f3a9c.{rest}")) {
        Ok(probe) => cert.verify_is_valid_for_subject_name(&probe).is_err(),
        Err(_) => true,
    }
}

// ---------------------------------------------------------------- stream

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ciphertext read from the socket and not yet given to rustls.
struct Input {
    socket: Stream,
    /// Ciphertext read from the socket; `start..end` is not yet given to
    /// rustls. Allocated once per session: a fresh buffer per read cost a
    /// map and an unmap of 256 KiB each time (above malloc's mmap
    /// threshold), a fifth of the write throughput.
    chunk: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

/// The socket's write half and the buffer records are sealed into, kept
/// between writes: a fresh one per write (above malloc's mmap threshold
/// for a 128 KiB request) was a map and an unmap every time.
struct Output {
    socket: Stream,
    sealed: Vec<u8>,
}

impl Output {
    /// Puts everything rustls has to send on the socket. The session is
    /// never held across a socket write that waits: a reader must be able
    /// to drain the peer while this write waits for the peer to read. So
    /// records go straight from rustls's buffers to the socket while it
    /// takes them at once; what it does not take is copied out, the
    /// session let go, and the rest written.
    fn send(&mut self, mut conn: MutexGuard<'_, rustls::Connection>) -> io::Result<()> {
        while conn.wants_write() {
            match conn.write_tls(&mut NoWait(&self.socket)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if !conn.wants_write() {
            return Ok(());
        }
        self.sealed.clear();
        while conn.wants_write() {
            conn.write_tls(&mut self.sealed)?;
        }
        drop(conn);
        let sent = self.socket.write_all(&self.sealed);
        if self.sealed.capacity() > KEEP_SEALED {
            // A 32 MiB read reply need not stay allocated for the session.
            self.sealed = Vec::new();
        }
        sent
    }
}

/// A socket write that never waits: `MSG_DONTWAIT`, `WouldBlock` when
/// the socket's buffer is full.
struct NoWait<'a>(&'a Stream);

impl NoWait<'_> {
    /// A session over another session has no descriptor to send on at
    /// once: its records take the copied-out path.
    fn fd(&self) -> io::Result<std::os::fd::BorrowedFd<'_>> {
        self.0
            .plain_fd()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))
    }
}

const NO_WAIT: rustix::net::SendFlags =
    rustix::net::SendFlags::DONTWAIT.union(rustix::net::SendFlags::NOSIGNAL);

impl Write for NoWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(rustix::net::send(self.fd()?, buf, NO_WAIT)?)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut control = rustix::net::SendAncillaryBuffer::default();
        Ok(rustix::net::sendmsg(
            self.fd()?,
            bufs,
            &mut control,
            NO_WAIT,
        )?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Session {
    conn: Mutex<rustls::Connection>,
    /// Held while reading: one reader at a time. Lock order: `input`, then
    /// `output`, then `conn`.
    input: Mutex<Input>,
    /// Held from sealing records until they are on the socket, so that
    /// records leave in the order they were sealed.
    output: Mutex<Output>,
    /// For shutdown and timeouts.
    raw: Stream,
}

/// A TLS session over a Unix or TCP socket. Clones share the session:
/// one thread may read while others write, which a plain
/// `rustls::StreamOwned` cannot do (its reads and writes need the same
/// `&mut`). Reads wait on the socket without holding the session, so a
/// writer is never stuck behind a reader waiting for data.
#[derive(Clone)]
pub struct TlsStream {
    session: Arc<Session>,
}

/// The largest sealing buffer kept between writes.
const KEEP_SEALED: usize = 4 << 20;

/// How big a chunk of ciphertext one socket read takes.
const READ_CHUNK: usize = 256 << 10;

fn tls_failed(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsStream {
    /// Runs the server side of the TLS handshake on `socket`.
    pub fn accept(socket: Stream, tls: &ServerTls) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(Arc::clone(&tls.config)).map_err(tls_failed)?;
        Self::handshake(socket, conn.into())
    }

    /// Runs the client side of the TLS handshake on `socket`; the server's
    /// certificate must name `name`.
    pub fn connect(
        socket: Stream,
        tls: &ClientTls,
        name: ServerName<'static>,
    ) -> io::Result<TlsStream> {
        let conn =
            rustls::ClientConnection::new(Arc::clone(&tls.config), name).map_err(tls_failed)?;
        Self::handshake(socket, conn.into())
    }

    fn handshake(socket: Stream, mut conn: rustls::Connection) -> io::Result<TlsStream> {
        // Replies of up to 32 MiB are sealed in one go.
        conn.set_buffer_limit(None);
        let mut raw = socket.try_clone()?;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut raw) {
                // Tell the peer why (the alert is queued), best effort.
                let _ = conn.write_tls(&mut raw);
                return Err(match e.kind() {
                    io::ErrorKind::UnexpectedEof => io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "TLS: the peer closed the connection during the handshake",
                    ),
                    _ if e.to_string().starts_with("TLS") => e,
                    _ => io::Error::new(e.kind(), format!("TLS: {e}")),
                });
            }
        }
        Ok(TlsStream {
            session: Arc::new(Session {
                conn: Mutex::new(conn),
                input: Mutex::new(Input {
                    socket: socket.try_clone()?,
                    chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
                    start: 0,
                    end: 0,
                    eof: false,
                }),
                output: Mutex::new(Output {
                    socket: socket.try_clone()?,
                    sealed: Vec::new(),
                }),
                raw: socket,
            }),
        })
    }

    /// The cipher suite the handshake settled on, in the IANA name's
    /// spelling (`TLS13_AES_128_GCM_SHA256`).
    pub fn cipher_suite(&self) -> Option<&'static str> {
        let conn = lock(&self.session.conn);
        conn.negotiated_cipher_suite()
            .and_then(|suite| suite.suite().as_str())
    }

    /// The socket under the session.
    pub(super) fn raw(&self) -> &Stream {
        &self.session.raw
    }

    /// Sends a close_notify, best effort: a clean end the peer can tell
    /// from a cut connection.
    pub fn close_notify(&self) {
        let mut out = lock(&self.session.output);
        let mut conn = lock(&self.session.conn);
        conn.send_close_notify();
        let _ = out.send(conn);
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut input = lock(&self.session.input);
        loop {
            let mut conn = lock(&self.session.conn);
            match conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify. NBD frames its
                // messages, so a cut message is still an error to the
                // caller; between messages it is an end like any other.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let input = &mut *input;
            if input.start < input.end || input.eof {
                let mut rest = &input.chunk[input.start..input.end];
                let fed = conn.read_tls(&mut rest)?;
                input.start += fed;
                let processed = conn.process_new_packets();
                let queued = conn.wants_write();
                drop(conn);
                if processed.is_err() {
                    // Send the alert only if no writer holds the socket: a
                    // writer blocked on a peer that does not read would
                    // hold this read (and the error) for ever. Otherwise
                    // cut the connection, which also frees that writer.
                    match self.session.output.try_lock() {
                        Ok(mut out) => {
                            let _ = out.send(lock(&self.session.conn));
                        }
                        Err(_) => {
                            let _ = self.session.raw.shutdown();
                        }
                    }
                } else if queued {
                    // A key update or a ticket. A writer holding the socket
                    // sends it with its next records instead.
                    if let Ok(mut out) = self.session.output.try_lock() {
                        let _ = out.send(lock(&self.session.conn));
                    }
                }
                processed.map_err(tls_failed)?;
                if input.eof && fed == 0 && input.start == input.end {
                    // rustls has seen the end and has nothing left.
                    let mut conn = lock(&self.session.conn);
                    return match conn.reader().read(buf) {
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                        Err(e) => Err(e),
                    };
                }
                continue;
            }
            drop(conn);
            let n = loop {
                match input.socket.read(&mut input.chunk) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            input.start = 0;
            input.end = n;
            if n == 0 {
                input.eof = true;
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.session.output);
        let mut conn = lock(&self.session.conn);
        conn.writer().write_all(buf)?;
        out.send(conn)?;
        Ok(buf.len())
    }

    /// Every slice in one go: sealed together, one socket write.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&self.session.output);
        let mut conn = lock(&self.session.conn);
        let mut total = 0;
        for buf in bufs {
            conn.writer().write_all(buf)?;
            total += buf.len();
        }
        out.send(conn)?;
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
