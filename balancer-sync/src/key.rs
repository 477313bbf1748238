//! The pair's shared HMAC-SHA256 key.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::KeyError;

/// The fewest key bytes accepted (and the number [`Key::generate`] makes).
pub const MIN_KEY_BYTES: usize = 32;

/// Key files larger than this are refused before they are read (a key is 64 hex digits).
const MAX_KEY_FILE: u64 = 4096;

/// The shared secret of a balancer pair: at least 32 bytes, used as an HMAC-SHA256 key.
///
/// Its `Debug` output is redacted; no error or log line ever shows it. The bytes are
/// overwritten when the key is dropped.
#[derive(Clone)]
pub struct Key {
    bytes: Vec<u8>,
    hmac: hmac::Key,
}

impl Key {
    /// Loads a key file: hex digits (surrounding whitespace trimmed) of at least 32 bytes,
    /// as `openssl rand -hex 32 > /etc/balancer/ha.key` writes.
    ///
    /// A file that group or other can access (`mode & 0o077 != 0`) is refused with an
    /// error naming the path and the mode: `chmod 600` it.
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // The mode of the file opened, not of whatever the path names a moment later.
        let meta = file.metadata().map_err(io)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_KEY_FILE {
            return Err(KeyError::NotHex);
        }
        let key = Key::from_hex(&text);
        wipe(&mut text.into_bytes());
        key
    }

    /// Parses hex digits (surrounding whitespace trimmed, either case) of at least 32 bytes.
    pub fn from_hex(s: &str) -> Result<Key, KeyError> {
        let s = s.trim().as_bytes();
        if !s.len().is_multiple_of(2) {
            return Err(KeyError::NotHex);
        }
        let mut bytes = Vec::with_capacity(s.len() / 2);
        for pair in s.chunks_exact(2) {
            match (nibble(pair[0]), nibble(pair[1])) {
                (Some(hi), Some(lo)) => bytes.push(hi << 4 | lo),
                _ => {
                    wipe(&mut bytes);
                    return Err(KeyError::NotHex);
                }
            }
        }
        if bytes.len() < MIN_KEY_BYTES {
            let n = bytes.len();
            wipe(&mut bytes);
            return Err(KeyError::TooShort { bytes: n });
        }
        Ok(Key::from_bytes(bytes))
    }

    /// A new random 32-byte key from the operating system's generator (ring's
    /// `SystemRandom`).
    ///
    /// # Panics
    ///
    /// If the operating system's random generator fails, which on Linux means `getrandom`
    /// itself is broken: there is no safe key without it. [`Key::try_generate`] returns
    /// the error instead.
    pub fn generate() -> Key {
        match Key::try_generate() {
            Ok(key) => key,
            Err(e) => panic!("cannot generate a pair key: {e}"),
        }
    }

    /// [`Key::generate`] returning an error instead of panicking.
    pub fn try_generate() -> Result<Key, KeyError> {
        let mut bytes = vec![0u8; MIN_KEY_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Random)?;
        Ok(Key::from_bytes(bytes))
    }

    /// The key as lowercase hex, the format [`Key::from_hex`] and [`Key::from_file`] read.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(self.bytes.len() * 2);
        for b in &self.bytes {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        s
    }

    fn from_bytes(bytes: Vec<u8>) -> Key {
        let hmac = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        Key { bytes, hmac }
    }

    pub(crate) fn hmac(&self) -> &hmac::Key {
        &self.hmac
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<redacted, {} bytes>)", self.bytes.len())
    }
}

impl PartialEq for Key {
    /// Constant-time comparison of the key bytes.
    fn eq(&self, other: &Key) -> bool {
        self.bytes.len() == other.bytes.len()
            && self
                .bytes
                .iter()
                .zip(&other.bytes)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl Eq for Key {}

impl Drop for Key {
    fn drop(&mut self) {
        wipe(&mut self.bytes);
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Overwrites key material before it is freed.
fn wipe(bytes: &mut Vec<u8>) {
    for b in bytes.iter_mut() {
        // black_box keeps the optimizer from dropping stores to memory about to be freed.
        *b = std::hint::black_box(0);
    }
    std::hint::black_box(&bytes);
    bytes.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn temp_file(name: &str, contents: &str, mode: u32) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("balancer-sync-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn hex_roundtrip_and_case() {
        let k = Key::from_hex(HEX).unwrap();
        assert_eq!(k.to_hex(), HEX);
        let upper = Key::from_hex(&format!("  {}\n", HEX.to_uppercase())).unwrap();
        assert_eq!(k, upper);
    }

    #[test]
    fn hex_rejects_short_odd_and_non_hex() {
        assert!(matches!(
            Key::from_hex(&HEX[..62]),
            Err(KeyError::TooShort { bytes: 31 })
        ));
        assert!(matches!(Key::from_hex(&HEX[..63]), Err(KeyError::NotHex)));
        let bad = format!("{}zz", &HEX[..62]);
        assert!(matches!(Key::from_hex(&bad), Err(KeyError::NotHex)));
        assert!(matches!(
            Key::from_hex(""),
            Err(KeyError::TooShort { bytes: 0 })
        ));
        // Longer keys are fine.
        assert!(Key::from_hex(&format!("{HEX}{HEX}")).is_ok());
    }

    #[test]
    fn generate_is_random_and_32_bytes() {
        let a = Key::generate();
        let b = Key::generate();
        assert_eq!(a.to_hex().len(), 64);
        assert_ne!(a, b);
        assert_eq!(Key::from_hex(&a.to_hex()).unwrap(), a);
    }

    #[test]
    fn debug_is_redacted() {
        let k = Key::from_hex(HEX).unwrap();
        let d = format!("{k:?}");
        assert!(!d.contains("0011"), "{d}");
        assert!(d.contains("redacted"));
    }

    #[test]
    fn file_with_mode_600_loads() {
        let p = temp_file("ok.key", &format!("{HEX}\n"), 0o600);
        assert_eq!(Key::from_file(&p).unwrap().to_hex(), HEX);
        let p = temp_file("ok400.key", HEX, 0o400);
        assert!(Key::from_file(&p).is_ok());
    }

    #[test]
    fn file_readable_by_others_is_refused_with_path_and_mode() {
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            let p = temp_file(&format!("bad{mode:o}.key"), HEX, mode);
            let e = Key::from_file(&p).unwrap_err();
            assert!(
                matches!(e, KeyError::Permissions { mode: m, .. } if m == mode),
                "{e:?}"
            );
            let text = e.to_string();
            assert!(text.contains(&p.display().to_string()), "{text}");
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
            assert!(!text.contains("0011"), "{text}");
        }
    }

    #[test]
    fn file_errors_never_show_key_material() {
        let p = temp_file("short.key", &HEX[..40], 0o600);
        let e = Key::from_file(&p).unwrap_err().to_string();
        assert!(!e.contains(&HEX[..8]), "{e}");
        let missing = std::env::temp_dir().join("balancer-sync-no-such.key");
        let e = Key::from_file(&missing).unwrap_err();
        assert!(matches!(e, KeyError::Io { .. }));
        assert!(e.to_string().contains("balancer-sync-no-such.key"));
    }
}
