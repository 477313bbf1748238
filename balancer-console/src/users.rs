//! Local users: a file of its own (mode 0600), one `name:role:argon2-hash` a line.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Sees every page, acts on nothing.
    Viewer,
    /// Also drains, disables, enables backends and reloads the config.
    Operator,
}

impl Role {
    /// The name in the users file and on the pages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = UserError;
    fn from_str(s: &str) -> Result<Role, UserError> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            _ => Err(UserError::Role(s.to_string())),
        }
    }
}

/// A users-file problem.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// File.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Others than the owner may read or write the file.
    #[error("{path}: mode {mode:o} lets others read it; chmod 600 it")]
    Mode {
        /// File.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not `name:role:hash`.
    #[error("{path}:{line}: {err}")]
    Line {
        /// File.
        path: PathBuf,
        /// Line number.
        line: usize,
        /// Why.
        err: String,
    },
    /// Not `viewer` or `operator`.
    #[error("unknown role {0:?} (viewer or operator)")]
    Role(String),
    /// Names are 1–64 of `A-Z a-z 0-9 . _ -`.
    #[error("bad user name {0:?}: 1 to 64 letters, digits, '.', '_' or '-'")]
    Name(String),
    /// `add` of an existing user.
    #[error("user {0} exists (use passwd)")]
    Exists(String),
    /// `passwd`/`remove` of an unknown user.
    #[error("no user {0}")]
    Missing(String),
    /// Too short a password.
    #[error("the password must have at least {MIN_PASSWORD} characters")]
    Short,
    /// Hashing failed.
    #[error("password hashing: {0}")]
    Hash(String),
}

/// Shortest accepted password.
pub const MIN_PASSWORD: usize = 10;

/// One user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Role.
    pub role: Role,
    /// Argon2id PHC string.
    pub hash: String,
}

/// The users file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Users {
    users: BTreeMap<String, User>,
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Hashes a password with Argon2id (default parameters) and a random salt.
pub fn hash_password(password: &str) -> Result<String, UserError> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| UserError::Hash("no randomness".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| UserError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// Checks a password against a PHC string; a malformed hash never matches.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

impl Users {
    /// Reads the file; refuses one that others may read. A missing file is no users.
    pub fn load(path: &Path) -> Result<Users, UserError> {
        let io = |err| UserError::Io {
            path: path.to_path_buf(),
            err,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Users::default()),
            Err(e) => return Err(io(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(UserError::Mode {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Users::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Users, UserError> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |err: String| UserError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                err,
            };
            let mut parts = line.splitn(3, ':');
            let (Some(name), Some(role), Some(hash)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(err("expected name:role:hash".into()));
            };
            if !valid_name(name) {
                return Err(err(format!("bad user name {name:?}")));
            }
            let role = role.parse().map_err(|e: UserError| err(e.to_string()))?;
            if PasswordHash::new(hash).is_err() {
                return Err(err("the hash is not a PHC string".into()));
            }
            let user = User {
                role,
                hash: hash.to_string(),
            };
            if users.insert(name.to_string(), user).is_some() {
                return Err(err(format!("user {name} listed twice")));
            }
        }
        Ok(Users { users })
    }

    /// Writes the file atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), UserError> {
        let io = |err| UserError::Io {
            path: path.to_path_buf(),
            err,
        };
        let mut text = String::from("# balancer console users: name:role:argon2id hash\n");
        for (name, u) in &self.users {
            text.push_str(&format!("{name}:{}:{}\n", u.role, u.hash));
        }
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Looks a user up.
    pub fn get(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// No users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Names and roles, sorted by name.
    pub fn list(&self) -> impl Iterator<Item = (&str, Role)> {
        self.users.iter().map(|(n, u)| (n.as_str(), u.role))
    }

    /// Adds a user.
    pub fn add(&mut self, name: &str, role: Role, password: &str) -> Result<(), UserError> {
        if !valid_name(name) {
            return Err(UserError::Name(name.to_string()));
        }
        if self.users.contains_key(name) {
            return Err(UserError::Exists(name.to_string()));
        }
        if password.chars().count() < MIN_PASSWORD {
            return Err(UserError::Short);
        }
        let hash = hash_password(password)?;
        self.users.insert(name.to_string(), User { role, hash });
        Ok(())
    }

    /// Sets a user's password, and its role when given.
    pub fn passwd(
        &mut self,
        name: &str,
        password: &str,
        role: Option<Role>,
    ) -> Result<(), UserError> {
        if password.chars().count() < MIN_PASSWORD {
            return Err(UserError::Short);
        }
        let hash = hash_password(password)?;
        let u = self
            .users
            .get_mut(name)
            .ok_or_else(|| UserError::Missing(name.to_string()))?;
        u.hash = hash;
        if let Some(r) = role {
            u.role = r;
        }
        Ok(())
    }

    /// Removes a user.
    pub fn remove(&mut self, name: &str) -> Result<(), UserError> {
        self.users
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| UserError::Missing(name.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("console-users-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("users")
    }

    #[test]
    fn add_passwd_remove_round_trip_with_mode_0600() {
        let p = tmp("rt");
        let mut u = Users::load(&p).unwrap();
        assert!(u.is_empty());
        u.add("alice", Role::Operator, "correct horse battery")
            .unwrap();
        u.add("bob", Role::Viewer, "another long one").unwrap();
        assert!(matches!(
            u.add("bob", Role::Viewer, "another long one"),
            Err(UserError::Exists(_))
        ));
        assert!(matches!(
            u.add("b:x", Role::Viewer, "another long one"),
            Err(UserError::Name(_))
        ));
        assert!(matches!(
            u.add("carol", Role::Viewer, "short"),
            Err(UserError::Short)
        ));
        u.save(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            !text.contains("correct horse"),
            "the password is not stored"
        );
        let mut back = Users::load(&p).unwrap();
        assert_eq!(back, u);
        let alice = back.get("alice").unwrap();
        assert!(verify_password("correct horse battery", &alice.hash));
        assert!(!verify_password("correct horse batterx", &alice.hash));
        back.passwd("alice", "a new password here", Some(Role::Viewer))
            .unwrap();
        assert_eq!(back.get("alice").unwrap().role, Role::Viewer);
        assert!(verify_password(
            "a new password here",
            &back.get("alice").unwrap().hash
        ));
        back.remove("bob").unwrap();
        assert!(matches!(back.remove("bob"), Err(UserError::Missing(_))));
        assert_eq!(
            back.list().collect::<Vec<_>>(),
            vec![("alice", Role::Viewer)]
        );
    }

    #[test]
    fn refuses_readable_file_and_bad_lines() {
        let p = tmp("mode");
        Users::default().save(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Users::load(&p),
            Err(UserError::Mode { mode: 0o644, .. })
        ));
        for (text, line) in [
            ("alice:operator\n", 1),
            (
                "# c\nalice:admin:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA\n",
                2,
            ),
            ("alice:viewer:plaintext\n", 1),
        ] {
            match Users::parse(&p, text) {
                Err(UserError::Line { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(!verify_password("x", "not a hash"));
    }
}
