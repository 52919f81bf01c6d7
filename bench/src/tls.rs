//! Scenario 9: NBD over TLS on TCP (127.0.0.1): `qemu-img bench` against
//! `copyctl serve --tcp ... --tls-creds DIR` (on a completed journal, as in
//! scenario 4) and against `qemu-nbd` with a `tls-creds-x509` object on the
//! same directory: one CA, one server certificate and key, one client
//! certificate and key, made with the `openssl` CLI (README's recipe) into
//! a fresh directory of the work directory, keys mode 0600.
//!
//! qemu-img 10.0's `bench` takes no `--object`, so it cannot hold TLS
//! credentials itself: it benchmarks a Unix-socket re-export by a
//! qemu-storage-daemon whose `driver=nbd` node is QEMU's NBD client with
//! TLS to the server under test (see [`start_tls_client`]). Both servers
//! are measured through that same extra hop, which adds the same work to
//! each side and so narrows any gap between them.
//!
//! What TLS costs a live copy and a plain copy into a remote export
//! (scenario 8's namespaces, TLS against clear) is [`crate::remote::tls_cost`].

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::report::Better;
use crate::serving::{bench_on, cases, completed_copy, start_serve_with};
use crate::util::{Context, Guard, Res, remove, wait_for_path};
use crate::{Ctx, human};

const EXPORT: &str = "disk";

/// The credentials: `server` (server-cert.pem, server-key.pem,
/// ca-cert.pem) and `client` (client-cert.pem, client-key.pem, ca-cert.pem).
pub struct Creds {
    pub server: PathBuf,
    pub client: PathBuf,
}

fn make_creds(ctx: &Ctx) -> Res<Creds> {
    let dir = ctx.path("tls-creds");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).ctx(|| format!("remove {}", dir.display()))?;
    }
    let (server, client) = (dir.join("server"), dir.join("client"));
    for d in [&dir, &server, &client] {
        std::fs::create_dir(d).ctx(|| format!("create {}", d.display()))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .ctx(|| "chmod".into())?;
    }
    // README's "NBD over TCP: TLS" recipe, with names for 127.0.0.1.
    let script = r#"set -e
umask 077
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
openssl req -x509 $ec -days 2 -subj "/CN=livecopy bench CA" \
  -keyout ca-key.pem -out ca-cert.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl req $ec -subj "/CN=localhost" -keyout server/server-key.pem -out server.csr
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.214.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -days 2 \
  -out server/server-cert.pem -extfile server.ext
openssl req $ec -subj "/CN=client" -keyout client/client-key.pem -out client.csr
printf 'subjectAltName=DNS:client.example\nextendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -days 2 \
  -out client/client-cert.pem -extfile client.ext
cp ca-cert.pem server/ca-cert.pem
cp ca-cert.pem client/ca-cert.pem
chmod 600 server/server-key.pem client/client-key.pem
"#;
    crate::util::run(
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .stdin(Stdio::null()),
    )?;
    Ok(Creds { server, client })
}

/// A free TCP port on 127.0.0.1 (bound, then released for qemu-nbd).
fn free_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").ctx(|| "bind 127.0.0.1:0".into())?;
    Ok(l.local_addr().ctx(|| "local address".into())?.port())
}

/// Waits until something accepts on 127.0.0.1:`port`.
fn wait_for_port(port: u16, timeout: Duration) -> Res<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    fail!("nothing listens on 127.0.0.1:{port}")
}

/// qemu-nbd on `image`, TCP on 127.0.0.1 with TLS from `creds` (it
/// verifies client certificates against ca-cert.pem, as copyctl does).
fn start_qemu_nbd_tls(ctx: &Ctx, image: &Path, creds: &Path) -> Res<(Guard, u16)> {
    let port = free_port()?;
    let log = std::fs::File::create(ctx.path("qemu-nbd-tls.log")).ctx(|| "log".into())?;
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}",
            creds.display()
        ))
        .args(["--tls-creds", "tls0", "-b", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-x", EXPORT])
        .args([
            "-f",
            "raw",
            "--persistent",
            "--cache=writeback",
            "--aio=threads",
        ])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let guard = Guard::spawn(&mut cmd, "qemu-nbd")?;
    wait_for_port(port, Duration::from_secs(10)).map_err(|e| {
        let log = std::fs::read_to_string(ctx.path("qemu-nbd-tls.log")).unwrap_or_default();
        format!("qemu-nbd with TLS: {e}: {log}")
    })?;
    Ok((guard, port))
}

/// QEMU's NBD client with TLS, for `qemu-img bench`: qemu-img 10.0's
/// bench takes no `--object`, so a qemu-storage-daemon holds the
/// `tls-creds-x509` object (endpoint=client, the credentials in `client`),
/// connects to 127.0.0.1:`port` through TLS (a `driver=nbd` node) and
/// re-exports that node on a Unix socket, which qemu-img bench uses. The
/// same path for both servers.
fn start_tls_client(ctx: &Ctx, client: &Path, port: u16) -> Res<(Guard, String)> {
    let sock = ctx.path("tls-client.sock");
    remove(&sock)?;
    let log_path = ctx.path("tls-client.log");
    let log = std::fs::File::create(&log_path).ctx(|| "log".into())?;
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            client.display()
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=remote,server.type=inet,server.host=127.0.0.1,\
             server.port={port},export={EXPORT},tls-creds=tls0"
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg(format!(
            "type=nbd,id=exp0,node-name=remote,name={EXPORT},writable=on"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let guard = Guard::spawn(&mut cmd, "qemu-storage-daemon (TLS client)")?;
    wait_for_path(&sock, Duration::from_secs(10)).map_err(|e| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        format!("qemu-storage-daemon as the TLS client: {e}: {log}")
    })?;
    Ok((
        guard,
        format!("nbd+unix:///{EXPORT}?socket={}", sock.display()),
    ))
}

pub fn run(ctx: &mut Ctx) -> Res<()> {
    for tool in ["openssl", "bash", "qemu-storage-daemon"] {
        if Command::new(tool)
            .arg(if tool == "bash" {
                "--version"
            } else {
                "version"
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            ctx.report
                .note(format!("9: not run: {tool} is not installed"));
            return Ok(());
        }
    }
    let creds = make_creds(ctx)?;
    let (src, image, journal) = completed_copy(ctx, "tls")?;
    let size = std::fs::metadata(&image).ctx(|| "stat".into())?.len();
    let cases = cases(ctx);
    let mut ours: Vec<Vec<f64>> = vec![vec![]; cases.len()];
    let mut peer: Vec<Vec<f64>> = vec![vec![]; cases.len()];
    for rep in 0..ctx.reps {
        // Alternate who goes first.
        for turn in 0..2 {
            let serve_ours = (rep + turn) % 2 == 0;
            let (mut guard, port, into) = if serve_ours {
                let extra = [
                    "--tcp".to_string(),
                    "127.0.0.1:0".into(),
                    "--tls-creds".into(),
                    creds.server.display().to_string(),
                    "--export".into(),
                    EXPORT.into(),
                ];
                let serve = start_serve_with(ctx, None, &journal, &src, &image, "tls", &extra)?;
                if serve.serving["phase"] != "completed" || serve.serving["tcp_tls"] != true {
                    fail!(
                        "serve on a completed journal with TLS says {}",
                        serve.serving
                    );
                }
                let port = serve.serving["tcp"]
                    .as_str()
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                    .map(|a| a.port())
                    .ok_or_else(|| format!("no TCP address in {}", serve.serving))?;
                (serve.guard, port, &mut ours)
            } else {
                let (g, port) = start_qemu_nbd_tls(ctx, &image, &creds.server)?;
                (g, port, &mut peer)
            };
            let (mut client, uri) = start_tls_client(ctx, &creds.client, port)?;
            let how = ["-f".to_string(), "raw".into()];
            for (i, (_, what, write, bs, count)) in cases.iter().enumerate() {
                let mib_s = bench_on(&how, &uri, *write, *bs, *count)?;
                eprintln!(
                    "   rep {rep}: {} {what} over TLS: {mib_s:.1} MiB/s",
                    if serve_ours {
                        "copyctl serve"
                    } else {
                        "qemu-nbd"
                    }
                );
                into[i].push(mib_s);
            }
            client.kill();
            guard.kill();
        }
    }
    let section = format!("9 NBD over TLS (TCP 127.0.0.1), {} image", human(size));
    for (i, (key, what, _, _, count)) in cases.iter().enumerate() {
        ctx.report.row(
            &format!("tls.{key}"),
            &section,
            &format!("`qemu-img bench` {what} through TLS ({count} requests, depth 16)"),
            "MiB/s",
            Better::Higher,
            ("copyctl serve", &ours[i]),
            ("qemu-nbd", &peer[i]),
        );
    }
    ctx.report.note(
        "9: both servers use the same credentials (one CA, ECDSA P-256 keys made with openssl, \
         client certificates required); qemu-img bench (default cache mode, its own clock, as in 4) \
         cannot hold TLS credentials, so it runs against a qemu-storage-daemon that re-exports, \
         on a Unix socket, its TLS connection to the server under test: the same extra hop for both",
    );
    crate::remote::tls_cost(ctx, &creds)
}
