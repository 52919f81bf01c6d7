//! livecopy: copy a disk image while a guest keeps writing to it, then hand
//! the guest over to the copy so that no crash, at any moment, loses an
//! acknowledged write.
//!
//! The piece that makes the hand-over safe is the [`journal`]: a small file
//! the copy engine updates, durably, before the first write that goes to the
//! destination alone. After any crash, [`journal::open_file`] (or `copyctl
//! recover`) reads it back and names the image that holds every acknowledged
//! write, or refuses when the evidence cannot decide.
//!
//! All I/O goes through [`storage::Storage`]; [`storage::SimDisk`] is a
//! deterministic in-memory disk that can lose power, tear writes and rot, so
//! embedders can test their own crash handling against it.
//!
//! Crate invariants (ARCHITECTURE.md has the full list):
//! 1. No write reaches the destination alone before the Switched record is durable.
//! 2. Recovery never names a wrong image; when it cannot decide, it refuses.
//! 3. A failed fsync/fdatasync is fatal for that file; never retried.
//! 4. Only `storage` opens, reads, writes or syncs files.

pub mod control;
pub mod engine;
pub mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzz;
mod image;
pub mod journal;
pub mod nbd;
pub mod restart;
pub mod socket;
pub mod storage;

pub use error::{Error, ErrorKind, Result};

/// Fills `bytes` from the kernel's random source, for journal UUIDs and
/// writer ids. Uniqueness, not secrecy, is what matters here.
pub fn random_bytes(bytes: &mut [u8]) {
    let mut filled = 0;
    while filled < bytes.len() {
        match rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("getrandom failed: {e}"),
        }
    }
}
