//! Typed errors. No variant carries a payload or key byte.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a datagram was refused, a message could not be sealed, or a socket failed.
///
/// Display texts name sizes, versions, addresses and reasons, never bytes of a datagram.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The datagram is shorter than a header and a tag.
    #[error("datagram too short ({len} bytes)")]
    TooShort {
        /// The datagram's length.
        len: usize,
    },
    /// The datagram does not start with `BLBS`.
    #[error("bad magic: not a pair-sync datagram")]
    BadMagic,
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {version}")]
    BadVersion {
        /// The version byte of the header.
        version: u8,
    },
    /// The HMAC-SHA256 tag does not verify: wrong key, forged or corrupted datagram.
    #[error("authentication failed (bad HMAC tag)")]
    BadMac,
    /// The tag verified but the body does not decode (or has trailing bytes).
    #[error("malformed message body")]
    Malformed,
    /// The sealed message (or a received datagram) exceeds [`crate::MAX_DATAGRAM`].
    #[error("message of {len} bytes exceeds the {max}-byte datagram limit")]
    TooLarge {
        /// The length reached (a lower bound when encoding stopped early).
        len: usize,
        /// The limit, [`crate::MAX_DATAGRAM`].
        max: usize,
    },
    /// A duplicate, a sequence number older than the window, or an older epoch.
    #[error("replayed or stale message")]
    Replay,
    /// A socket operation failed.
    #[error("pair-sync socket {addr}: {source}")]
    Io {
        /// The local address bound (or to bind), or the peer's for a send.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration text given to [`crate::config_digest`] is not valid TOML.
    #[error("config digest: {0}")]
    Config(String),
}

/// Why a pair key could not be loaded. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be opened or read.
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable or writable by group or other.
    #[error(
        "key file {} has mode {mode:04o}: it must not be accessible by group or other (chmod 600)",
        path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits (`mode & 0o7777`).
        mode: u32,
    },
    /// The text is not an even number of hex digits.
    #[error("key is not hex: expected an even number of hex digits (openssl rand -hex 32)")]
    NotHex,
    /// Fewer than 32 bytes.
    #[error("key too short: {bytes} bytes, at least 32 needed (openssl rand -hex 32)")]
    TooShort {
        /// The number of bytes decoded.
        bytes: usize,
    },
    /// The operating system's random generator failed.
    #[error("system random generator failed")]
    Random,
}
