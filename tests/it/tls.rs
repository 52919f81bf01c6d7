//! NBD over TLS, both ways: our server against qemu-io, qemu-img and
//! nbdinfo; our client against qemu-nbd and nbdkit; and every refusal,
//! each with its reason and nothing written. Certificates are made here
//! with rcgen, in QEMU's directory layout.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use livecopy::nbd::tls;
use livecopy::nbd::{ServerHandle, bind_tcp};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::nbd::{MemDevice, Output, assert_ok, tool};

const MIB: usize = 1 << 20;

/// A certificate authority that issues certificates into directories.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Server,
    Client,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// Writes `ca-cert.pem` into `dir` (created).
    pub(crate) fn trust_in(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(tls::CA_CERT), self.issuer.pem()).unwrap();
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) and
    /// writes it and its key (mode 0600) into `dir` under `role`'s names.
    pub(crate) fn issue(&self, dir: &Path, role: Role, names: &[&str], expired: bool) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        // No keyUsage at all: QEMU refuses a critical one without
        // keyEncipherment, and rcgen marks it critical.
        params.extended_key_usages = vec![match role {
            Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_file, key_file) = match role {
            Role::Server => (tls::SERVER_CERT, tls::SERVER_KEY),
            Role::Client => (tls::CLIENT_CERT, tls::CLIENT_KEY),
        };
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(cert_file), cert.pem()).unwrap();
        let key_path = dir.join(key_file);
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A directory of credentials: `ca` trusted, a leaf for `role` and
/// `names` issued by `issuer`.
pub(crate) fn creds(dir: &Path, ca: &Ca, issuer: &Ca, role: Role, names: &[&str]) -> PathBuf {
    ca.trust_in(dir);
    issuer.issue(dir, role, names, false);
    dir.to_path_buf()
}

/// Our server on 127.0.0.1, TLS required with the credentials in `dir`.
fn serve_tls(dir: &Path, authz: &[String]) -> (ServerHandle, Arc<MemDevice>, u16) {
    serve_tls_sized(dir, authz, MIB)
}

fn serve_tls_sized(
    dir: &Path,
    authz: &[String],
    size: usize,
) -> (ServerHandle, Arc<MemDevice>, u16) {
    let device = MemDevice::new(size);
    let config = tls::server_config(dir, authz).expect("server credentials");
    let server = bind_tcp("127.0.0.1:0", device.clone(), "disk")
        .expect("bind")
        .tls(config)
        .spawn();
    let port = server.local_addr().expect("address").port();
    (server, device, port)
}

/// qemu-io through QEMU's NBD client with TLS credentials from `dir`.
fn qemu_io_tls(port: u16, dir: &Path, commands: &[&str]) -> Output {
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    );
    let image = format!(
        "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},\
         file.export=disk,file.tls-creds=tls0"
    );
    let mut args = vec!["--object", &object, "--image-opts", &image];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    tool("qemu-io", &args)
}

/// A libnbd URI for the export on `port` with credentials from `dir`.
fn nbds(port: u16, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        dir.display()
    )
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: Ca,
    server: PathBuf,
    client: PathBuf,
}

/// One CA; a server certificate for 127.0.0.1 and localhost; a client
/// certificate for `client.example`.
fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let server = creds(
        &dir.path().join("server"),
        &ca,
        &ca,
        Role::Server,
        &["127.0.0.1", "localhost"],
    );
    let client = creds(
        &dir.path().join("client"),
        &ca,
        &ca,
        Role::Client,
        &["client.example"],
    );
    Pki {
        _dir: dir,
        ca,
        server,
        client,
    }
}

// ---------------------------------------------------------------- server

#[test]
fn qemu_io_writes_and_reads_back_through_tls() {
    let pki = pki();
    let (server, device, port) = serve_tls(&pki.server, &[]);
    let out = qemu_io_tls(
        port,
        &pki.client,
        &["write -P 0x6b 64k 128k", "flush", "read -P 0x6b 64k 128k"],
    );
    assert_ok(&out);
    assert_eq!(device.bytes(64 << 10, 128 << 10), vec![0x6b; 128 << 10]);
    // A 4 MiB write and read: many TLS records each way.
    let out = qemu_io_tls(
        port,
        &pki.client,
        &["write -P 0x21 0 1M", "read -P 0x21 0 1M"],
    );
    assert_ok(&out);
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.dropped, 0, "{stats:?}");
}

#[test]
fn qemu_img_convert_through_tls_and_compare() {
    let pki = pki();
    let (server, device, port) = serve_tls(&pki.server, &[]);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.raw");
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&source, &data).unwrap();
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.client.display()
    );
    let target = format!(
        "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},\
         file.export=disk,file.tls-creds=tls0"
    );
    let source_arg = source.to_str().unwrap();
    let out = tool(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &object,
            "-f",
            "raw",
            source_arg,
            "--target-image-opts",
            &target,
        ],
    );
    assert_ok(&out);
    assert!(
        device.bytes(0, MIB) == data,
        "the export differs from the source"
    );
    // --image-opts covers both images, so the file is named by options.
    let file = format!("driver=raw,file.driver=file,file.filename={source_arg}");
    let out = tool(
        "qemu-img",
        &[
            "compare",
            "--object",
            &object,
            "--image-opts",
            &file,
            &target,
        ],
    );
    assert_eq!(out.code, 0, "{}", out.text());
    server.shutdown().expect("shutdown");
}

#[test]
fn nbdinfo_reads_the_export_over_tls() {
    let pki = pki();
    let (server, _device, port) = serve_tls(&pki.server, &[]);
    let out = tool("nbdinfo", &["--size", &nbds(port, &pki.client)]);
    assert_eq!(out.code, 0, "{}", out.text());
    assert_eq!(out.stdout.trim(), MIB.to_string());
    server.shutdown().expect("shutdown");
}

/// A refused client writes nothing, and the server says why it refused.
fn assert_refused(out: &Output, device: &MemDevice, why: &[&str]) {
    assert_ne!(out.code, 0, "{}", out.text());
    let text = out.text();
    eprintln!("refused as expected:\n{text}");
    assert!(
        why.iter().any(|w| text.contains(w)),
        "expected one of {why:?}:\n{text}"
    );
    assert!(
        device.bytes(0, MIB).iter().all(|&b| b == 0),
        "a refused client wrote"
    );
}

#[test]
fn a_plain_client_is_refused_by_a_tls_server() {
    let pki = pki();
    let (server, device, port) = serve_tls(&pki.server, &[]);
    // qemu-io without TLS: GO is answered TLS_REQD.
    let url = format!("nbd://127.0.0.1:{port}/disk");
    let out = tool("qemu-io", &["-f", "raw", &url, "-c", "write -P 1 0 4k"]);
    assert_refused(&out, &device, &["TLS", "tls"]);
    // nbdinfo without TLS.
    let out = tool("nbdinfo", &["--size", &url]);
    assert_refused(&out, &device, &["TLS", "tls"]);
    server.shutdown().expect("shutdown");
}

#[test]
fn clients_without_a_valid_certificate_are_refused() {
    let pki = pki();
    let (server, device, port) = serve_tls(&pki.server, &[]);
    let dir = tempfile::tempdir().unwrap();
    // No client certificate at all.
    let none = dir.path().join("none");
    pki.ca.trust_in(&none);
    let out = qemu_io_tls(port, &none, &["write -P 1 0 4k"]);
    // Under TLS 1.3 the client finishes its handshake before the server
    // checks its certificate: QEMU learns of the refusal as a closed
    // socket on its next write.
    let cut = ["TLS", "certificate", "Certificate", "Broken pipe", "reset"];
    assert_refused(&out, &device, &cut);
    // A certificate from another CA.
    let other = Ca::new("another CA");
    let foreign = dir.path().join("foreign");
    pki.ca.trust_in(&foreign);
    other.issue(&foreign, Role::Client, &["client.example"], false);
    // (QEMU checks its own certificate against its CA and would not even
    // connect; libnbd does not, so nbdinfo presents it.)
    let out = tool("nbdinfo", &["--size", &nbds(port, &foreign)]);
    assert_refused(&out, &device, &cut);
    // An expired one from the right CA (GnuTLS would not send it, so
    // nbdinfo, which does not check its own certificate, is the client).
    let expired = dir.path().join("expired");
    pki.ca.trust_in(&expired);
    pki.ca
        .issue(&expired, Role::Client, &["client.example"], true);
    let out = tool("nbdinfo", &["--size", &nbds(port, &expired)]);
    assert_refused(&out, &device, &cut);
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.requests, 0, "{stats:?}");
}

#[test]
fn authz_admits_only_the_named_client_certificates() {
    let pki = pki();
    let (server, device, port) = serve_tls(&pki.server, &["admin.example".to_string()]);
    let out = qemu_io_tls(port, &pki.client, &["write -P 1 0 4k"]);
    let cut = ["TLS", "certificate", "Certificate", "Broken pipe", "reset"];
    assert_refused(&out, &device, &cut);
    server.shutdown().expect("shutdown");
    let dir = tempfile::tempdir().unwrap();
    let admin = creds(
        dir.path(),
        &pki.ca,
        &pki.ca,
        Role::Client,
        &["admin.example"],
    );
    let (server, device, port) = serve_tls(&pki.server, &["admin.example".to_string()]);
    let out = qemu_io_tls(port, &admin, &["write -P 3 0 4k", "read -P 3 0 4k"]);
    assert_ok(&out);
    assert_eq!(device.bytes(0, 4096), vec![3; 4096]);
    server.shutdown().expect("shutdown");
}

#[test]
fn a_server_key_readable_by_others_is_refused() {
    let pki = pki();
    let key = pki.server.join(tls::SERVER_KEY);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = tls::server_config(&pki.server, &[]).expect_err("a 0644 key was accepted");
    let text = err.to_string();
    assert!(
        text.contains("readable by others") && text.contains("0644"),
        "{text}"
    );
    assert!(!text.contains("PRIVATE KEY"), "the key leaked: {text}");
    // The client's key too.
    let key = pki.client.join(tls::CLIENT_KEY);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = tls::client_config(&pki.client).expect_err("a 0640 key was accepted");
    assert!(err.to_string().contains("readable by others"), "{err}");
}

/// Greets a server on `port` over TCP, without TLS.
fn raw_client(port: u16) -> std::net::TcpStream {
    use livecopy::nbd::proto;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let greeting: [u8; proto::GREETING_LEN] = proto::read_array(&mut s).unwrap();
    proto::parse_greeting(&greeting).unwrap();
    s.write_all(&proto::encode_client_flags(proto::FLAG_C_FIXED_NEWSTYLE))
        .unwrap();
    s
}

/// Sends one option and reads one reply: (reply type, message).
fn ask(s: &mut std::net::TcpStream, option: u32, data: &[u8]) -> (u32, String) {
    use livecopy::nbd::proto;
    s.write_all(&proto::encode_option(option, data)).unwrap();
    let header = proto::parse_option_reply_header(&proto::read_array(s).unwrap()).unwrap();
    assert_eq!(header.option, option);
    let mut body = vec![0u8; header.length as usize];
    s.read_exact(&mut body).unwrap();
    (header.reply, String::from_utf8_lossy(&body).into_owned())
}

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// copyctl with `args`, killed if it runs longer than `limit` (a command
/// that should have been refused would otherwise serve forever).
fn copyctl_within(args: &[&str], limit: Duration) -> Output {
    let mut child = {
        let _no_journal_changes = crate::support::spawning();
        std::process::Command::new(env!("CARGO_BIN_EXE_copyctl"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run copyctl")
    };
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn before_starttls_every_option_is_refused_with_tls_reqd() {
    use livecopy::nbd::proto;
    let pki = pki();
    let (server, device, port) = serve_tls(&pki.server, &[]);
    let mut s = raw_client(port);
    let go = proto::encode_info_request("disk", &[]).unwrap();
    for (option, data) in [
        (proto::OPT_GO, &go[..]),
        (proto::OPT_INFO, &go[..]),
        (proto::OPT_LIST, &[][..]),
        (proto::OPT_STRUCTURED_REPLY, &[][..]),
        (proto::OPT_SET_META_CONTEXT, &b"whatever"[..]),
        (4242, &[][..]),
    ] {
        let (reply, message) = ask(&mut s, option, data);
        assert_eq!(reply, proto::REP_ERR_TLS_REQD, "option {option}: {message}");
        assert!(message.contains("TLS"), "{message}");
    }
    // STARTTLS carries no data.
    let (reply, _) = ask(&mut s, proto::OPT_STARTTLS, b"x");
    assert_eq!(reply, proto::REP_ERR_INVALID);
    // ABORT is still answered.
    let (reply, _) = ask(&mut s, proto::OPT_ABORT, &[]);
    assert_eq!(reply, proto::REP_ACK);
    // EXPORT_NAME cannot be refused with a reply: the connection ends.
    let mut s = raw_client(port);
    s.write_all(&proto::encode_option(proto::OPT_EXPORT_NAME, b"disk"))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(s.read(&mut byte), Ok(0) | Err(_)),
        "EXPORT_NAME got an answer"
    );
    // STARTTLS is acknowledged.
    let mut s = raw_client(port);
    let (reply, _) = ask(&mut s, proto::OPT_STARTTLS, &[]);
    assert_eq!(reply, proto::REP_ACK);
    drop(s);
    assert!(device.bytes(0, MIB).iter().all(|&b| b == 0));
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.requests, 0);
}

#[test]
fn serve_tcp_needs_tls_or_the_loud_opt_out() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let source = path("source.raw");
    std::fs::write(&source, vec![7u8; MIB]).unwrap();
    let base = |extra: &[&str]| {
        let mut args = vec![
            "serve".to_string(),
            "--journal".into(),
            path("job.journal"),
            "--source".into(),
            source.clone(),
            "--dest".into(),
            path("dest.raw"),
            "--socket".into(),
            path("nbd.sock"),
            "--control".into(),
            path("control.sock"),
            "--tcp".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        copyctl_within(&args, Duration::from_secs(60))
    };
    // Neither: a usage error.
    let out = run(base(&[]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("--tls-creds") && out.stderr.contains("--tcp-plaintext-insecure"),
        "{}",
        out.stderr
    );
    // Both: a usage error too.
    let creds = pki.server.to_str().unwrap();
    let out = run(base(&["--tls-creds", creds, "--tcp-plaintext-insecure"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    // --tls-authz without credentials.
    let out = run(base(&[
        "--tcp-plaintext-insecure",
        "--tls-authz",
        "a.example",
    ]));
    assert_eq!(out.code, 9, "{}", out.stderr);
    assert!(
        out.stderr.contains("--tls-authz needs --tls-creds"),
        "{}",
        out.stderr
    );
    // A key readable by others: refused before anything is created.
    let key = pki.server.join(tls::SERVER_KEY);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(base(&["--tls-creds", creds]));
    assert_eq!(out.code, 9, "{}", out.stderr);
    assert!(out.stderr.contains("readable by others"), "{}", out.stderr);
    assert!(!out.stderr.contains("PRIVATE KEY"), "{}", out.stderr);
    for leftover in ["job.journal", "dest.raw", "nbd.sock", "control.sock"] {
        assert!(
            !dir.path().join(leftover).exists(),
            "{leftover} was created"
        );
    }
}

// ---------------------------------------------------------------- client

use livecopy::storage::{Location, NbdOptions, NbdStorage, Storage};

/// A server process on TCP or a Unix socket, killed when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` and waits until `ready` (or panics with its stderr).
fn daemon(program: &str, args: &[String], mut ready: impl FnMut() -> bool) -> Daemon {
    let child = {
        let _no_journal_changes = crate::support::spawning();
        std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"))
    };
    let mut d = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if let Some(status) = d.0.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = d.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("{program} exited ({status}): {err}");
        }
        assert!(
            Instant::now() < deadline,
            "{program} did not listen in 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tcp_ready(port: u16) -> impl FnMut() -> bool {
    move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// nbdkit's memory plugin on 127.0.0.1:`port` with `tls` options.
fn nbdkit(port: u16, tls: &[String]) -> Daemon {
    let mut args = vec![
        "--foreground".to_string(),
        "--exit-with-parent".into(),
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ];
    args.extend(tls.iter().cloned());
    args.extend(["memory".to_string(), MIB.to_string()]);
    daemon("nbdkit", &args, tcp_ready(port))
}

fn location(uri: &str) -> livecopy::storage::NbdAddress {
    match Location::parse(uri).expect("a URI") {
        Location::Nbd(a) => a,
        Location::Path(_) => panic!("{uri} is not an NBD URI"),
    }
}

fn options(creds: Option<&Path>) -> NbdOptions {
    NbdOptions {
        tls_creds: creds.map(Path::to_path_buf),
        ..NbdOptions::default()
    }
}

/// Writes, flushes and reads back through `storage`.
fn round_trip(storage: &NbdStorage, seed: u8) {
    let data: Vec<u8> = (0..(256 << 10))
        .map(|i| (i as u8).wrapping_mul(seed))
        .collect();
    storage.write_at(64 << 10, &data).expect("write");
    storage.sync_data().expect("flush");
    let mut back = vec![0u8; data.len()];
    storage.read_at(64 << 10, &mut back).expect("read");
    assert!(back == data, "read back differs");
}

/// The servers (GnuTLS's and ours) take the client's order, and ours
/// offers AES-128-GCM first: the cheapest of TLS 1.3's suites for a
/// server that decrypts a whole disk on one thread.
fn assert_cheapest_suite(storage: &NbdStorage) {
    assert_eq!(storage.info().tls_suite, Some("TLS13_AES_128_GCM_SHA256"));
}

/// The error connecting gives; it must contain one of `why`.
fn connect_error(uri: &str, creds: Option<&Path>, why: &[&str]) -> String {
    let err = NbdStorage::connect_with(&location(uri), true, options(creds))
        .expect_err("connected where it must be refused")
        .to_string();
    assert!(
        why.iter().any(|w| err.contains(w)),
        "expected one of {why:?}: {err}"
    );
    eprintln!("refused as expected: {err}");
    err
}

#[test]
fn our_client_through_qemu_nbd_over_tls_on_a_unix_socket() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (server, image, socket) = qemu_nbd_tls(&pki, dir.path(), None);
    let uri = format!("nbds+unix:///disk?socket={}", socket.display());
    let storage = NbdStorage::connect_with(&location(&uri), true, options(Some(&pki.client)))
        .expect("connect over TLS");
    assert_cheapest_suite(&storage);
    round_trip(&storage, 3);
    drop(storage);
    // A plain client is told the server wants TLS.
    let plain = format!("nbd+unix:///disk?socket={}", socket.display());
    connect_error(&plain, None, &["requires TLS"]);
    // A client without a certificate: qemu-nbd requires one.
    let anonymous = dir.path().join("anonymous");
    pki.ca.trust_in(&anonymous);
    connect_error(
        &uri,
        Some(&anonymous),
        &["may require a client certificate"],
    );
    drop(server);
    let file = std::fs::read(&image).unwrap();
    assert!(file[..64 << 10].iter().all(|&b| b == 0));
    assert!(
        file[64 << 10..(64 << 10) + 16].iter().any(|&b| b != 0),
        "the write is missing"
    );
}

/// qemu-nbd serving a fresh 1 MiB image over TLS on a Unix socket (the
/// certificate's name for it: "localhost"), with `priority` as its GnuTLS
/// priority string when given: (server, image, socket).
fn qemu_nbd_tls(pki: &Pki, dir: &Path, priority: Option<&str>) -> (Daemon, PathBuf, PathBuf) {
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; MIB]).unwrap();
    let socket = dir.join("qemu-nbd.sock");
    let mut object = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        pki.server.display()
    );
    if let Some(priority) = priority {
        object.push_str(&format!(",priority={priority}"));
    }
    let args = [
        "--object",
        &object,
        "--tls-creds",
        "tls0",
        "--format=raw",
        "--persistent",
        "--export-name=disk",
        "--socket",
        socket.to_str().unwrap(),
        image.to_str().unwrap(),
    ]
    .map(String::from);
    let server = daemon("qemu-nbd", &args, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    (server, image, socket)
}

/// A server held to TLS 1.2 (a GnuTLS priority string) still gets
/// AES-128-GCM first.
#[test]
fn a_tls_1_2_server_also_gets_aes_128_first() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (_server, _, socket) = qemu_nbd_tls(&pki, dir.path(), Some("NORMAL:-VERS-TLS1.3"));
    let uri = format!("nbds+unix:///disk?socket={}", socket.display());
    let storage = NbdStorage::connect_with(&location(&uri), true, options(Some(&pki.client)))
        .expect("connect over TLS 1.2");
    assert_eq!(
        storage.info().tls_suite,
        Some("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
    );
    round_trip(&storage, 9);
}

#[test]
fn our_client_through_nbdkit_tls_require_with_credentials_in_the_uri() {
    let pki = pki();
    let port = free_port();
    let tls = [
        "--tls=require".to_string(),
        format!("--tls-certificates={}", pki.server.display()),
        "--tls-verify-peer".into(),
    ];
    let _server = nbdkit(port, &tls);
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.client.display()
    );
    let storage = NbdStorage::connect(&location(&uri), true).expect("connect over TLS");
    assert_cheapest_suite(&storage);
    round_trip(&storage, 5);
    assert_eq!(storage.len().unwrap(), MIB as u64);
}

#[test]
fn our_client_through_our_server_over_tls() {
    let pki = pki();
    let (server, device, port) = serve_tls(&pki.server, &[]);
    let uri = format!("nbds://127.0.0.1:{port}/disk");
    let storage = NbdStorage::connect_with(&location(&uri), true, options(Some(&pki.client)))
        .expect("connect over TLS");
    assert_cheapest_suite(&storage);
    round_trip(&storage, 7);
    // 8 MiB at once: many records each way, and replies sealed while the
    // next request is being read.
    let big: Vec<u8> = (0..(8 << 20)).map(|i| (i % 253) as u8).collect();
    let device_size = MIB as u64;
    assert!(big.len() as u64 > device_size);
    storage.write_at(0, &big[..MIB]).expect("write 1 MiB");
    let mut back = vec![0u8; MIB];
    storage.read_at(0, &mut back).expect("read 1 MiB");
    assert!(back == big[..MIB]);
    drop(storage);
    assert!(device.bytes(0, MIB) == big[..MIB]);
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.dropped, 0, "{stats:?}");
}

/// Four writers and readers at once on one TLS connection, 8 MiB
/// requests (larger than a socket's buffer, so every one meets a full
/// socket), 128 MiB each way: records leave both ends straight from
/// rustls's buffers while the socket takes them, and through the
/// copied-out remainder when it is full. Every byte must arrive, in order.
#[test]
fn concurrent_requests_over_tls_arrive_whole_when_sockets_fill() {
    const PART: usize = 8 * MIB;
    const PARTS: usize = 4;
    const ROUNDS: u8 = 4;
    let pki = pki();
    let (server, device, port) = serve_tls_sized(&pki.server, &[], PARTS * PART);
    let uri = format!("nbds://127.0.0.1:{port}/disk");
    let storage = NbdStorage::connect_with(&location(&uri), true, options(Some(&pki.client)))
        .expect("connect over TLS");
    let pattern = |part: usize, round: u8| -> Vec<u8> {
        (0..PART)
            .map(|i| (i as u8) ^ round.wrapping_mul(31) ^ (part as u8).wrapping_mul(7))
            .collect()
    };
    std::thread::scope(|scope| {
        for part in 0..PARTS {
            let storage = &storage;
            scope.spawn(move || {
                let at = (part * PART) as u64;
                let mut back = vec![0u8; PART];
                for round in 0..ROUNDS {
                    let data = pattern(part, round);
                    storage.write_at(at, &data).expect("write");
                    storage.read_at(at, &mut back).expect("read");
                    assert!(back == data, "part {part} round {round} read back differs");
                }
            });
        }
    });
    storage.sync_data().expect("flush");
    drop(storage);
    for part in 0..PARTS {
        assert!(
            device.bytes(part * PART, PART) == pattern(part, ROUNDS - 1),
            "part {part} differs on the device"
        );
    }
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats.dropped, 0, "{stats:?}");
}

#[test]
fn our_client_refuses_servers_it_cannot_trust() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let uri = |port: u16| format!("nbds://127.0.0.1:{port}/disk");
    // A certificate for another name.
    let misnamed = dir.path().join("misnamed");
    pki.ca.trust_in(&misnamed);
    pki.ca
        .issue(&misnamed, Role::Server, &["other.example"], false);
    let (server, device, port) = serve_tls(&misnamed, &[]);
    connect_error(&uri(port), Some(&pki.client), &["not valid for name"]);
    server.shutdown().unwrap();
    assert!(device.bytes(0, MIB).iter().all(|&b| b == 0));
    // An expired one.
    let expired = dir.path().join("expired");
    pki.ca.trust_in(&expired);
    pki.ca.issue(&expired, Role::Server, &["127.0.0.1"], true);
    let (server, _device, port) = serve_tls(&expired, &[]);
    connect_error(&uri(port), Some(&pki.client), &["xpired"]);
    server.shutdown().unwrap();
    // One from a CA we do not trust.
    let other = Ca::new("another CA");
    let foreign = dir.path().join("foreign");
    other.trust_in(&foreign);
    other.issue(&foreign, Role::Server, &["127.0.0.1"], false);
    let (server, _device, port) = serve_tls(&foreign, &[]);
    connect_error(&uri(port), Some(&pki.client), &["UnknownIssuer"]);
    server.shutdown().unwrap();
    // No credentials at all.
    connect_error(&uri(port), None, &["needs TLS credentials"]);
}

#[test]
fn a_server_that_refuses_or_drops_starttls_is_refused() {
    let pki = pki();
    // nbdkit without TLS answers STARTTLS with an error.
    let port = free_port();
    let _plain = nbdkit(port, &["--tls=off".to_string()]);
    let uri = format!("nbds://127.0.0.1:{port}/");
    let err = connect_error(&uri, Some(&pki.client), &["refused STARTTLS"]);
    assert!(err.contains("without TLS"), "{err}");
    // A server (or a man in the middle) that hangs up at STARTTLS.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        use livecopy::nbd::proto;
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&proto::encode_greeting()).unwrap();
        let _flags: [u8; 4] = proto::read_array(&mut s).unwrap();
        let header: [u8; proto::OPTION_HEADER_LEN] = proto::read_array(&mut s).unwrap();
        proto::parse_option_header(&header).unwrap().option
    });
    let uri = format!("nbds://127.0.0.1:{port}/");
    connect_error(
        &uri,
        Some(&pki.client),
        &["closed the connection at STARTTLS"],
    );
    assert_eq!(
        fake.join().unwrap(),
        livecopy::nbd::proto::OPT_STARTTLS,
        "STARTTLS was not first"
    );
}

#[test]
fn copy_into_a_tls_export_and_recover_says_tls() {
    let pki = pki();
    let (server, device, port) = serve_tls(&pki.server, &[]);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.raw");
    let data: Vec<u8> = (0..MIB).map(|i| (i / 512 % 249) as u8 + 1).collect();
    std::fs::write(&source, &data).unwrap();
    let journal = dir.path().join("job.journal");
    let uri = format!("nbds://127.0.0.1:{port}/disk");
    let args = [
        "copy",
        "--journal",
        journal.to_str().unwrap(),
        "--tls-creds",
        pki.client.to_str().unwrap(),
        source.to_str().unwrap(),
        &uri,
    ];
    let out = copyctl_within(&args, Duration::from_secs(120));
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        device.bytes(0, MIB) == data,
        "the export differs from the source"
    );
    // The address names no credentials: without --tls-creds recover can
    // only warn that it cannot check the export; with them it checks it.
    // The verdict is the same either way.
    let out = copyctl_within(
        &["recover", "--no-repair", journal.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout.contains("transport:     NBD over TLS (nbds)"),
        "{}",
        out.text()
    );
    assert!(
        out.stderr.contains("cannot reach") && out.stderr.contains("TLS credentials"),
        "{}",
        out.text()
    );
    let out = copyctl_within(
        &[
            "recover",
            "--tls-creds",
            pki.client.to_str().unwrap(),
            journal.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout.contains("authoritative: destination")
            && out.stdout.contains("transport:     NBD over TLS (nbds)"),
        "{}",
        out.text()
    );
    assert!(out.stderr.is_empty(), "{}", out.text());
    // Without credentials the copy is refused before anything is written.
    let fresh = dir.path().join("fresh.journal");
    let (server2, device2, port2) = serve_tls(&pki.server, &[]);
    let uri2 = format!("nbds://127.0.0.1:{port2}/disk");
    let out = copyctl_within(
        &[
            "copy",
            "--journal",
            fresh.to_str().unwrap(),
            source.to_str().unwrap(),
            &uri2,
        ],
        Duration::from_secs(60),
    );
    assert_ne!(out.code, 0, "{}", out.text());
    assert!(
        out.stderr.contains("needs TLS credentials"),
        "{}",
        out.text()
    );
    assert!(device2.bytes(0, MIB).iter().all(|&b| b == 0));
    server2.shutdown().unwrap();
    server.shutdown().unwrap();
}

/// `--tls-authz` names client certificates exactly: a certificate for
/// `*.corp.example`, signed by the right CA, does not pass as
/// `client.corp.example`; one for `client.corp.example` does.
#[test]
fn tls_authz_never_matches_a_wildcard_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("authz CA");
    let server = creds(
        &dir.path().join("server"),
        &ca,
        &ca,
        Role::Server,
        &["127.0.0.1"],
    );
    for (name, admitted) in [("*.corp.example", false), ("client.corp.example", true)] {
        let client = creds(
            &dir.path().join(format!("client-{admitted}")),
            &ca,
            &ca,
            Role::Client,
            &[name],
        );
        let config = tls::server_config(&server, &["client.corp.example".to_string()]).unwrap();
        let srv = bind_tcp("127.0.0.1:0", MemDevice::new(MIB), "disk")
            .unwrap()
            .tls(config)
            .spawn();
        let port = srv.local_addr().unwrap().port();
        let uri = format!(
            "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
            client.display()
        );
        let Location::Nbd(address) = Location::parse(&uri).unwrap() else {
            unreachable!("an nbds URI")
        };
        let outcome = NbdStorage::connect_with(&address, true, NbdOptions::default());
        assert_eq!(outcome.is_ok(), admitted, "client certificate for {name}");
    }
}

/// A `ca-cert.pem` that is a dangling symlink is refused at start, instead
/// of quietly serving without client authentication.
#[test]
fn a_dangling_ca_certificate_link_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("dangling CA");
    let server = creds(
        &dir.path().join("server"),
        &ca,
        &ca,
        Role::Server,
        &["127.0.0.1"],
    );
    std::fs::remove_file(server.join(tls::CA_CERT)).unwrap();
    std::os::unix::fs::symlink("/nonexistent/ca.pem", server.join(tls::CA_CERT)).unwrap();
    let refused = tls::server_config(&server, &[]).expect_err("refused");
    assert!(
        refused.describe().contains("ca-cert.pem"),
        "{}",
        refused.describe()
    );
}

// ---------------------------------------------------------------------------
// Unauthenticated peers and a blocked writer.

/// Peers that connect and never finish negotiating (nobody is
/// authenticated before TLS) hold at most a bounded number of connection
/// threads, and each for at most the negotiation deadline: 200 idle
/// half-negotiated connections leave the thread count bounded, and the
/// server still serves a real client afterwards.
#[test]
fn unauthenticated_peers_cannot_hold_unbounded_connections() {
    use livecopy::nbd::proto;
    use std::net::TcpStream;
    let pki = pki();
    let (server, _device, port) = serve_tls(&pki.server, &[]);
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let before = threads();
    let mut held = Vec::new();
    for _ in 0..200 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        // Half an option header, then silence.
        let _ = s.write_all(&proto::encode_client_flags(proto::FLAG_C_FIXED_NEWSTYLE));
        let _ = s.write_all(b"IHAVEOPT");
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = threads();
    println!("threads: {before} before, {during} with 200 idle unauthenticated peers");
    assert!(
        during <= before + 40,
        "{during} threads with 200 idle peers (from {before})"
    );
    // The deadline cuts the ones that were let in.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.stats().active > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.stats().active, 0, "{:?}", server.stats());
    drop(held);
    // A real client is served.
    let out = qemu_io_tls(
        port,
        &pki.client,
        &["write -P 0x3c 0 64k", "read -P 0x3c 0 64k"],
    );
    assert_ok(&out);
    server.shutdown().unwrap();
}

/// A corrupt record reaches a reader while another thread's write waits
/// for a peer that does not read: the reader reports the TLS error at once
/// (it must not wait for the writer to send its alert).
#[test]
fn a_tls_error_is_reported_while_a_writer_is_blocked() {
    use livecopy::nbd::Stream;
    use livecopy::nbd::tls::TlsStream;
    use std::net::{TcpListener, TcpStream};
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server_config = tls::server_config(&pki.server, &[]).unwrap();
    let accept = std::thread::spawn(move || {
        let (socket, _) = listener.accept().unwrap();
        let raw = socket.try_clone().unwrap();
        (
            TlsStream::accept(Stream::Tcp(socket), &server_config).unwrap(),
            raw,
        )
    });
    let socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client = TlsStream::connect(
        Stream::Tcp(socket),
        &tls::client_config(&pki.client).unwrap(),
        tls::server_name("127.0.0.1").unwrap(),
    )
    .unwrap();
    let (mut server_side, mut raw_server) = accept.join().unwrap();
    server_side.write_all(b"hello").unwrap();
    let mut five = [0u8; 5];
    client.clone().read_exact(&mut five).unwrap();
    // A writer that blocks: the server side never reads.
    let mut writer = client.clone();
    std::thread::spawn(move || {
        let _ = writer.write_all(&vec![7u8; 64 << 20]);
    });
    std::thread::sleep(Duration::from_millis(500));
    // A corrupt application-data record, as a flipped bit would make.
    let mut bogus = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    bogus.extend_from_slice(&[0x5a; 0x40]);
    raw_server.write_all(&bogus).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = client.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let _ = tx.send(reader.read(&mut buf).map_err(|e| e.to_string()));
    });
    let outcome = rx.recv_timeout(Duration::from_secs(5));
    // Unblock whatever is left before judging.
    let _ = raw_server.shutdown(std::net::Shutdown::Both);
    drop(server_side);
    match outcome {
        Ok(Err(e)) => assert!(e.contains("TLS"), "{e}"),
        Ok(Ok(n)) => panic!("a corrupt record read as {n} bytes"),
        Err(_) => panic!("the reader waited behind the blocked writer"),
    }
}

/// A session over another session (nothing in livecopy nests them, but
/// the stream takes any `Stream`): its records have no socket to go to
/// at once and take the copied-out path.
#[test]
fn a_session_inside_a_session_carries_data() {
    use livecopy::nbd::Stream;
    use livecopy::nbd::tls::TlsStream;
    let pki = pki();
    let server_tls = tls::server_config(&pki.server, &[]).expect("server credentials");
    let client_tls = tls::client_config(&pki.client).expect("client credentials");
    let name = || tls::server_name("localhost").expect("name");
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let server = std::thread::spawn(move || {
        let outer = TlsStream::accept(Stream::Unix(a), &server_tls).expect("outer accept");
        let mut inner = TlsStream::accept(Stream::Tls(outer), &server_tls).expect("inner accept");
        let mut got = vec![0u8; 5];
        inner.read_exact(&mut got).expect("inner read");
        inner.write_all(&got).expect("inner echo");
        got
    });
    let outer = TlsStream::connect(Stream::Unix(b), &client_tls, name()).expect("outer connect");
    let mut inner =
        TlsStream::connect(Stream::Tls(outer), &client_tls, name()).expect("inner connect");
    inner.write_all(b"hello").expect("inner write");
    let mut echo = vec![0u8; 5];
    inner.read_exact(&mut echo).expect("inner read");
    assert_eq!(server.join().unwrap(), b"hello");
    assert_eq!(echo, b"hello");
}
