//! Unix sockets that only their owner can reach.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::error::{Error, Result};

/// Binds a listening Unix socket at `path` with mode 0600, with no moment at
/// which another user could connect: the socket is bound inside a fresh
/// directory of mode 0700, made 0600, then renamed into place (refusing to
/// replace anything but a stale socket).
pub fn bind_private(path: &Path) -> Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            // A socket left by a dead server: reuse the name only if nobody answers.
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InvalidInput(format!(
                    "{} is in use by a running server",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| Error::io_at("remove stale socket", path, e))?;
        }
        Ok(_) => {
            return Err(Error::InvalidInput(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io_at("stat", path, e)),
    }
    let mut suffix = [0u8; 8];
    crate::random_bytes(&mut suffix);
    let private = parent.join(format!(
        ".copyctl-{}",
        crate::journal::recovery::hex(&suffix)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| Error::io_at("mkdir", &private, e))?;
    let staged = private.join("socket");
    let result = (|| {
        let listener = UnixListener::bind(&staged).map_err(|e| Error::io_at("bind", &staged, e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io_at("chmod", &staged, e))?;
        std::fs::rename(&staged, path).map_err(|e| Error::io_at("rename", path, e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result
}

use std::os::unix::fs::DirBuilderExt;

/// The effective uid of a connected peer.
pub fn peer_uid(stream: &UnixStream) -> Result<u32> {
    rustix::net::sockopt::socket_peercred(stream)
        .map(|cred| cred.uid.as_raw())
        .map_err(|e| Error::io("SO_PEERCRED", e.into()))
}

/// This process's effective uid.
pub fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}
