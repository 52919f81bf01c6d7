//! Where an image lives: a path, or an NBD export named by URI in the
//! syntax QEMU and libnbd use (`nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`, and the TLS forms `nbds://`,
//! `nbds+unix://`). Pure: parsing and printing only.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// The NBD port IANA assigned.
pub const NBD_PORT: u16 = 10809;

/// An image's location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A regular file or a block device.
    Path(PathBuf),
    /// An export of an NBD server.
    Nbd(NbdAddress),
}

/// How to reach an NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddress {
    /// The server's socket.
    pub endpoint: Endpoint,
    /// The export's name ("" for the default export).
    pub export: String,
    /// Whether the URI asks for TLS (`nbds`).
    pub tls: bool,
    /// TLS credentials in QEMU's layout (libnbd's `tls-certificates`
    /// query parameter); `nbds` only.
    pub tls_certificates: Option<PathBuf>,
    /// The name the server's certificate must carry, when not the host
    /// (`tls-hostname`; for `nbds+unix`, "localhost" without it).
    pub tls_hostname: Option<String>,
}

/// An NBD server's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP: a host name or address, and a port.
    Tcp {
        /// Host name, IPv4 address, or IPv6 address without brackets.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix-domain socket.
    Unix {
        /// The socket's path.
        socket: PathBuf,
    },
}

impl Location {
    /// Reads an image argument: a URI if it starts with a scheme this
    /// crate speaks, an error for any other `scheme://`, a path otherwise
    /// (so a file named like a URI needs a `./` in front).
    pub fn parse(text: &str) -> Result<Location> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(Location::Path(PathBuf::from(text)));
        };
        let looks_like_scheme = !scheme.is_empty()
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !looks_like_scheme {
            return Ok(Location::Path(PathBuf::from(text)));
        }
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => {
                return Err(bad(
                    text,
                    format!(
                        "the scheme {scheme:?} is not one of nbd, nbds, nbd+unix, nbds+unix \
                         (write ./{text} for a file of that name)"
                    ),
                ));
            }
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') {
            return Err(bad(text, "a fragment (#) means nothing here".into()));
        }
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).map_err(|why| bad(text, why))?;
        let mut socket = None;
        let mut tls_certificates = None;
        let mut tls_hostname = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("socket", value)) if unix => {
                    socket = Some(PathBuf::from(decode(value).map_err(|why| bad(text, why))?))
                }
                Some(("tls-certificates", value)) if tls => {
                    tls_certificates =
                        Some(PathBuf::from(decode(value).map_err(|why| bad(text, why))?))
                }
                Some(("tls-hostname", value)) if tls => {
                    tls_hostname = Some(decode(value).map_err(|why| bad(text, why))?)
                }
                _ => {
                    return Err(bad(
                        text,
                        format!("the query parameter {pair:?} is not supported"),
                    ));
                }
            }
        }
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    text,
                    "a Unix-socket URI names no host (nbd+unix:///EXPORT?socket=PATH)".into(),
                ));
            }
            let socket =
                socket.ok_or_else(|| bad(text, "a Unix-socket URI needs ?socket=PATH".into()))?;
            Endpoint::Unix { socket }
        } else {
            let (host, port) = split_host_port(authority).map_err(|why| bad(text, why))?;
            Endpoint::Tcp { host, port }
        };
        Ok(Location::Nbd(NbdAddress {
            endpoint,
            export,
            tls,
            tls_certificates,
            tls_hostname,
        }))
    }
}

fn bad(text: &str, why: String) -> Error {
    Error::InvalidInput(format!("{text:?} is not a usable NBD URI: {why}"))
}

fn split_host_port(authority: &str) -> std::result::Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("user names are not supported".into());
    }
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ]")?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or("junk after the IPv6 address")?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    let port = match port {
        None => NBD_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("the port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok((host.to_string(), port))
}

/// Percent-decoding, as URIs need; the result must be UTF-8.
fn decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("a bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes that are not UTF-8".to_string())
}

/// Percent-encodes what a URI path or query value cannot hold as is.
fn encode(text: &str, out: &mut fmt::Formatter<'_>) -> fmt::Result {
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@!$'()*+,;".contains(&b) {
            write!(out, "{}", b as char)?;
        } else {
            write!(out, "%{b:02X}")?;
        }
    }
    Ok(())
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        match &self.endpoint {
            Endpoint::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "{s}://[{host}]:{port}/")?;
                } else {
                    write!(f, "{s}://{host}:{port}/")?;
                }
                encode(&self.export, f)?;
            }
            Endpoint::Unix { socket } => {
                write!(f, "{s}+unix:///")?;
                encode(&self.export, f)?;
                f.write_str("?socket=")?;
                encode(&socket.to_string_lossy(), f)?;
            }
        }
        let mut separator = match self.endpoint {
            Endpoint::Tcp { .. } => '?',
            Endpoint::Unix { .. } => '&',
        };
        if let Some(dir) = &self.tls_certificates {
            write!(f, "{separator}tls-certificates=")?;
            encode(&dir.to_string_lossy(), f)?;
            separator = '&';
        }
        if let Some(name) = &self.tls_hostname {
            write!(f, "{separator}tls-hostname=")?;
            encode(name, f)?;
        }
        Ok(())
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Nbd(a) => a.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str, tls: bool) -> Location {
        Location::Nbd(NbdAddress {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls,
            tls_certificates: None,
            tls_hostname: None,
        })
    }

    fn unix(socket: &str, export: &str, tls: bool) -> Location {
        Location::Nbd(NbdAddress {
            endpoint: Endpoint::Unix {
                socket: socket.into(),
            },
            export: export.into(),
            tls,
            tls_certificates: None,
            tls_hostname: None,
        })
    }

    #[test]
    fn tls_parameters_parse_and_print_back() {
        let text = "nbds://10.0.0.1:10809/disk?tls-certificates=/etc/pki/my%20qemu&tls-hostname=vm.example";
        let Location::Nbd(a) = Location::parse(text).unwrap() else {
            panic!("not an NBD URI");
        };
        assert_eq!(a.tls_certificates, Some(PathBuf::from("/etc/pki/my qemu")));
        assert_eq!(a.tls_hostname.as_deref(), Some("vm.example"));
        assert_eq!(a.to_string(), text);
        let text = "nbds+unix:///disk?socket=/run/s.sock&tls-certificates=/pki";
        assert_eq!(Location::parse(text).unwrap().to_string(), text);
        // Plain URIs take no TLS parameters: they would not be used.
        assert!(Location::parse("nbd://h/disk?tls-certificates=/pki").is_err());
    }

    /// One table: what each argument means, or that it is refused.
    #[test]
    fn image_arguments_parse_as_documented() {
        let ok = [
            ("disk.img", Location::Path("disk.img".into())),
            ("/dev/vdb", Location::Path("/dev/vdb".into())),
            ("./nbd://x", Location::Path("./nbd://x".into())),
            ("dir/a:b", Location::Path("dir/a:b".into())),
            ("nbd://host", tcp("host", NBD_PORT, "", false)),
            ("nbd://host/", tcp("host", NBD_PORT, "", false)),
            (
                "nbd://10.0.0.2:10810/disk0",
                tcp("10.0.0.2", 10810, "disk0", false),
            ),
            ("nbds://host/a%20b/c", tcp("host", NBD_PORT, "a b/c", true)),
            ("nbd://[fd00::1]:7/x", tcp("fd00::1", 7, "x", false)),
            ("nbd://[::1]/x", tcp("::1", NBD_PORT, "x", false)),
            (
                "nbd+unix:///disk0?socket=/run/nbd.sock",
                unix("/run/nbd.sock", "disk0", false),
            ),
            (
                "nbds+unix://?socket=/tmp/a%20b.sock",
                unix("/tmp/a b.sock", "", true),
            ),
        ];
        for (text, expected) in ok {
            assert_eq!(Location::parse(text).expect(text), expected, "{text}");
        }
        let refused = [
            "http://host/x",
            "nbd+tcp://host/x",
            "nbd://:10809/x",
            "nbd://host:0/x",
            "nbd://host:99999/x",
            "nbd://host:port/x",
            "nbd://user@host/x",
            "nbd://[::1/x",
            "nbd://host/x?socket=/a",
            "nbd://host/x#frag",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/a",
            "nbd+unix:///x?socket=/a&tls=1",
            "nbd://host/%zz",
            "nbd://host/%ff",
        ];
        for text in refused {
            let e = Location::parse(text).expect_err(text);
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{text}");
        }
    }

    #[test]
    fn addresses_print_as_uris_that_parse_back() {
        for text in [
            "nbd://10.0.0.2:10810/disk0",
            "nbds://host:10809/a%20b/c",
            "nbd://[fd00::1]:7/x",
            "nbd+unix:///disk0?socket=/run/nbd.sock",
            "nbds+unix:///?socket=/tmp/a%20b.sock",
        ] {
            let parsed = Location::parse(text).expect(text);
            assert_eq!(parsed.to_string(), text);
            assert_eq!(Location::parse(&parsed.to_string()).expect(text), parsed);
        }
    }
}
