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
    let device = MemDevice::new(MIB);
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
