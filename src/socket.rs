//! Unix sockets that only their owner can reach.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::error::{Error, Result};

/// Longest socket path the kernel takes (`sun_path` minus its NUL).
const SUN_PATH_MAX: usize = 107;

/// Whether [`bind_private`] can bind at `path`: its directory exists and
/// nothing but a stale socket is there. A check before creating anything
/// else; the bind itself may still fail.
pub fn check_bindable(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::io_at(
            "bind",
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the directory {} does not exist", parent.display()),
            ),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io_at("stat", path, e)),
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InvalidInput(format!(
                    "{} is in use by a running server",
                    path.display()
                )));
            }
            Ok(())
        }
        Ok(_) => Err(Error::InvalidInput(format!(
            "{} exists and is not a socket",
            path.display()
        ))),
    }
}

/// Binds a listening Unix socket at `path` with mode 0600, with no moment at
/// which another user could connect: the socket is bound inside a fresh
/// directory of mode 0700, made 0600, then renamed into place without
/// replacing anything. A stale socket left by a dead server is removed
/// first; anything else at `path` is refused. (If the temporary path would
/// be too long for a socket address but `path` is not, it is bound in place
/// and made 0600 at once; in that short window its mode is what the umask
/// allows.)
pub fn bind_private(path: &Path) -> Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
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
    let mut suffix = [0u8; 6];
    crate::random_bytes(&mut suffix);
    let private = parent.join(format!(
        ".copyctl-{}",
        crate::journal::recovery::hex(&suffix)
    ));
    let staged = private.join("s");
    let len = |p: &Path| p.as_os_str().len();
    if len(&staged) > SUN_PATH_MAX && len(path) <= SUN_PATH_MAX {
        let listener = UnixListener::bind(path).map_err(|e| Error::io_at("bind", path, e))?;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            let _ = std::fs::remove_file(path);
            return Err(Error::io_at("chmod", path, e));
        }
        return Ok(listener);
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| Error::io_at("mkdir", &private, e))?;
    let result = (|| {
        let listener = UnixListener::bind(&staged).map_err(|e| Error::io_at("bind", &staged, e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io_at("chmod", &staged, e))?;
        rename_noreplace(&staged, path).map_err(|e| Error::io_at("rename", path, e))?;
        Ok(listener)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    let _ = std::fs::remove_dir(&private);
    result
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // A file system without RENAME_NOREPLACE: check, then rename.
        Err(rustix::io::Errno::INVAL) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
            }
            std::fs::rename(from, to)
        }
        Err(e) => Err(std::io::Error::from(e)),
    }
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
