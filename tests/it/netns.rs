//! Across hosts for real: two network namespaces joined by a veth pair,
//! qemu-storage-daemon exporting over TCP in one, `copyctl copy` in the
//! other. The namespaces are made and removed by the test (root needed, as
//! CI has); their names carry the process id and a counter, so parallel
//! runs never share one, and the addresses live only inside them.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::remote::{SIZE, path, patterned, qemu_img, recover_json};
use crate::serve::{Proc, tool};

const COPYCTL: &str = env!("CARGO_BIN_EXE_copyctl");
/// The server's side (namespace A) and the client's (namespace B).
const SERVER_ADDR: &str = "10.213.0.1";
const CLIENT_ADDR: &str = "10.213.0.2";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// `ip ARGS`, which must succeed.
fn ip<S: AsRef<OsStr>>(args: &[S]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {:?}: {}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair; removed when dropped, panics
/// included (removing a namespace removes its end of the pair, and the
/// pair goes with either end).
struct Hosts {
    server: String,
    client: String,
}

impl Hosts {
    fn new() -> Hosts {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let hosts = Hosts {
            server: format!("lc-a-{tag}"),
            client: format!("lc-b-{tag}"),
        };
        // Interface names have at most 15 bytes.
        let (veth_a, veth_b) = (format!("lca{tag}"), format!("lcb{tag}"));
        assert!(veth_a.len() <= 15, "{veth_a} is too long");
        ip(&["netns", "add", &hosts.server]);
        ip(&["netns", "add", &hosts.client]);
        ip(&[
            "link",
            "add",
            &veth_a,
            "netns",
            &hosts.server,
            "type",
            "veth",
            "peer",
            "name",
            &veth_b,
            "netns",
            &hosts.client,
        ]);
        for (ns, dev, addr) in [
            (&hosts.server, &veth_a, SERVER_ADDR),
            (&hosts.client, &veth_b, CLIENT_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// `ip netns exec NS PROGRAM ARGS...` as arguments for `ip`.
    fn exec(ns: &str, program: &str, args: &[String]) -> Vec<String> {
        let mut all = vec!["netns".into(), "exec".into(), ns.into(), program.into()];
        all.extend(args.iter().cloned());
        all
    }

    /// Waits until something in the server's namespace listens on `port`,
    /// as seen from the client's namespace.
    fn wait_listening(&self, port: u16, server: &mut Proc) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = Command::new("ip")
                .args(["netns", "exec", &self.client, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{SERVER_ADDR}/{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("probe");
            if probe.success() {
                return;
            }
            if let Some(status) = server.child.try_wait().expect("wait") {
                panic!("the server exited ({status}) before it listened on {port}");
            }
            assert!(
                Instant::now() < deadline,
                "nothing listened on {SERVER_ADDR}:{port} in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// SIGTERM, then a bounded wait: the daemon's image is complete and
/// unlocked afterwards.
fn stop(proc: &mut Proc) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(proc.child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `copyctl copy` in the client's namespace; returns how long it took.
fn copy_from_the_client(hosts: &Hosts, journal: &Path, source: &Path, uri: &str) -> Duration {
    let started = Instant::now();
    let run = tool(
        "ip",
        Hosts::exec(
            &hosts.client,
            COPYCTL,
            &[
                "copy".into(),
                "--journal".into(),
                path(journal).into(),
                path(source).into(),
                uri.into(),
            ],
        ),
        Duration::from_secs(120),
    );
    assert_eq!(run.code, 0, "copy to {uri}: {}", run.text());
    started.elapsed()
}

/// qemu-storage-daemon on 10.213.0.1:10809 in namespace A, `copyctl copy`
/// in namespace B into `nbd://10.213.0.1:10809/disk0`: the export's file
/// equals the source, and recover names the export by its URI. Then the
/// same through an nbdkit proxy in A that delays every write by 20 ms
/// (this kernel has no netem).
#[test]
fn copy_into_an_export_on_another_host() {
    let hosts = Hosts::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source.raw");
    patterned(&source);

    for (round, delayed) in [(0, false), (1, true)] {
        let image = dir.path().join(format!("dest{round}.raw"));
        qemu_img(&["create", "-q", "-f", "raw", path(&image), &SIZE.to_string()]);
        let qsd_args = vec![
            "--blockdev".to_string(),
            format!(
                "driver=file,node-name=file0,filename={},cache.direct=on",
                image.display()
            ),
            "--blockdev".into(),
            "driver=raw,node-name=disk0,file=file0".into(),
            "--nbd-server".into(),
            format!("addr.type=inet,addr.host={SERVER_ADDR},addr.port=10809"),
            "--export".into(),
            "type=nbd,id=export0,node-name=disk0,name=disk0,writable=on".into(),
        ];
        let mut qsd = Proc::spawn(
            "ip",
            Hosts::exec(&hosts.server, "qemu-storage-daemon", &qsd_args),
            Stdio::null(),
            Stdio::null(),
        );
        hosts.wait_listening(10809, &mut qsd);
        let mut proxy = None;
        let uri = if delayed {
            let args: Vec<String> = [
                "--foreground",
                "--exit-with-parent",
                "--ipaddr",
                SERVER_ADDR,
                "--port",
                "10810",
                "--filter=delay",
                "nbd",
                &format!("hostname={SERVER_ADDR}"),
                "port=10809",
                "export=disk0",
                "delay-write=20ms",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut nbdkit = Proc::spawn(
                "ip",
                Hosts::exec(&hosts.server, "nbdkit", &args),
                Stdio::null(),
                Stdio::null(),
            );
            hosts.wait_listening(10810, &mut nbdkit);
            proxy = Some(nbdkit);
            format!("nbd://{SERVER_ADDR}:10810/")
        } else {
            format!("nbd://{SERVER_ADDR}:10809/disk0")
        };
        let journal = dir.path().join(format!("j{round}.journal"));
        let took = copy_from_the_client(&hosts, &journal, &source, &uri);
        let recovered = recover_json(&journal);
        assert_eq!(recovered["authoritative"], "destination", "{recovered}");
        assert_eq!(recovered["image"]["uri"], uri.as_str(), "{recovered}");
        if let Some(mut nbdkit) = proxy {
            // 12 MiB of data in 1 MiB writes, two at a time at most: at
            // least six rounds of 20 ms.
            assert!(
                took >= Duration::from_millis(120),
                "the delayed copy took only {took:?}"
            );
            stop(&mut nbdkit);
        }
        stop(&mut qsd);
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            path(&source),
            path(&image),
        ]);
        println!(
            "copy across namespaces{}: {:.2} s",
            if delayed { " (20 ms per write)" } else { "" },
            took.as_secs_f64()
        );
    }
}
