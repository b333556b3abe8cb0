//! The cryptography of sign-in: password hashes, opaque tokens, one-time codes.
//!
//! - Passwords are hashed with argon2id at the configured cost. Hashes imported from older
//!   systems (bcrypt `$2a$`/`$2b$`/`$2y$`, or argon2 at another cost) verify and report that
//!   they need re-hashing.
//! - Opaque tokens (refresh, verification, reset) are 256 random bits, base64url; only their
//!   SHA-256 is stored.
//! - One-time codes have few bits, so they are stored as an HMAC keyed by the server secret: a
//!   copy of the database alone does not reveal them.
//! - A refresh token's successor is derived from it (HMAC), so the same old token always
//!   yields the same successor: that is how two tabs refreshing at once get the same pair
//!   back without any plaintext token being stored.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use aws_lc_rs::{constant_time, digest, hmac, rand};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Cost {
    /// Memory in KiB (OWASP: 19 MiB = 19456).
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Cost {
    fn default() -> Self {
        Self {
            memory_kib: Params::DEFAULT_M_COST,
            iterations: Params::DEFAULT_T_COST,
            parallelism: Params::DEFAULT_P_COST,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid argon2 parameters: {0}")]
pub struct CostError(String);

/// The outcome of checking a password against a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Wrong,
    /// Right; `rehash` when the stored hash is not argon2id at the configured cost.
    Right {
        rehash: bool,
    },
}

/// Hashes and verifies passwords. CPU-bound (tens of milliseconds): call it off the async
/// worker threads.
#[derive(Clone)]
pub struct Passwords {
    params: Params,
    /// The PHC prefix our own hashes start with: `$argon2id$v=19$m=…,t=…,p=…$`.
    current_prefix: String,
    /// A hash to verify against when there is no account, so that answering for an unknown
    /// email costs what answering for a known one does.
    decoy: String,
}

impl Passwords {
    pub fn new(cost: Argon2Cost) -> Result<Self, CostError> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
            .map_err(|e| CostError(e.to_string()))?;
        let mut passwords = Self {
            current_prefix: format!(
                "$argon2id$v=19$m={},t={},p={}$",
                cost.memory_kib, cost.iterations, cost.parallelism
            ),
            params,
            decoy: String::new(),
        };
        passwords.decoy = passwords
            .hash(&random_token())
            .map_err(|e| CostError(e.to_string()))?;
        Ok(passwords)
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// An argon2id PHC string with a fresh random salt.
    pub fn hash(&self, password: &str) -> Result<String, argon2::password_hash::Error> {
        Ok(self
            .argon2()
            .hash_password(password.as_bytes())?
            .to_string())
    }

    /// Checks `password` against `stored` (argon2 or bcrypt). A hash we cannot read is
    /// `Wrong`: the account cannot sign in with a password until it is reset.
    pub fn verify(&self, password: &str, stored: &str) -> Verified {
        if stored.starts_with("$argon2") {
            let Ok(parsed) = PasswordHash::new(stored) else {
                return Verified::Wrong;
            };
            // The parameters come from the stored hash, not from `self`.
            match self.argon2().verify_password(password.as_bytes(), &parsed) {
                Ok(()) => Verified::Right {
                    rehash: !stored.starts_with(&self.current_prefix),
                },
                Err(_) => Verified::Wrong,
            }
        } else if is_bcrypt(stored) {
            match bcrypt::verify(password, stored) {
                Ok(true) => Verified::Right { rehash: true },
                _ => Verified::Wrong,
            }
        } else {
            Verified::Wrong
        }
    }

    /// Spends the time of a verification without an account to verify against.
    pub fn decoy_verify(&self, password: &str) {
        let _ = self.verify(password, &self.decoy);
    }
}

/// Whether `hash` looks like a bcrypt hash of the variants older systems wrote.
pub fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|prefix| hash.starts_with(prefix))
        && hash.len() == 60
}

/// Whether `hash` is a password hash confab can verify (for imports).
pub fn is_supported_hash(hash: &str) -> bool {
    is_bcrypt(hash) || (hash.starts_with("$argon2") && PasswordHash::new(hash).is_ok())
}

/// 256 random bits, base64url without padding (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes).expect("the system random source works");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A uniformly random 6-digit code, zero-padded.
pub fn six_digit_code() -> String {
    // Rejection sampling: 4_294_000_000 is the largest multiple of a million below 2^32.
    loop {
        let mut bytes = [0u8; 4];
        rand::fill(&mut bytes).expect("the system random source works");
        let n = u32::from_le_bytes(bytes);
        if n < 4_294_000_000 {
            return format!("{:06}", n % 1_000_000);
        }
    }
}

/// The hex SHA-256 of an opaque token: what the store keeps and looks up.
pub fn token_hash(token: &str) -> String {
    hex(digest::digest(&digest::SHA256, token.as_bytes()).as_ref())
}

/// Compares two strings in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

/// Keyed derivations, with a key derived from the server secret.
#[derive(Clone)]
pub struct Keyed {
    key: hmac::Key,
}

impl Keyed {
    pub fn new(secret: &[u8]) -> Self {
        // A key of its own, so these values never coincide with anything signed by the
        // secret itself (access tokens under HS256).
        let derive = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let key = hmac::sign(&derive, b"confab/keyed-derivations/v1");
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()),
        }
    }

    fn mac(&self, parts: &[&str]) -> hmac::Tag {
        let mut context = hmac::Context::with_key(&self.key);
        for part in parts {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part.as_bytes());
        }
        context.sign()
    }

    /// The refresh token that succeeds `token`: always the same for the same token.
    pub fn successor(&self, token: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(&["refresh-successor", token]))
    }

    /// What the store keeps for a one-time code sent to `email`.
    pub fn code_hash(&self, email: &str, code: &str) -> String {
        hex(self.mac(&["one-time-code", email, code]).as_ref())
    }

    /// The signature of a media URL: `key` may be fetched until `expires` (Unix seconds).
    pub fn media_signature(&self, key: &str, expires: i64) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(&["media-url", key, &expires.to_string()]))
    }

    /// A short, stable, non-reversible label for `value` (rate-limit keys by email, so no
    /// address sits in the cache).
    pub fn label(&self, value: &str) -> String {
        hex(&self.mac(&["label", value]).as_ref()[..12])
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Passwords {
        Passwords::new(Argon2Cost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    #[test]
    fn argon2id_hashes_verify_and_know_their_cost() {
        let passwords = cheap();
        let hash = passwords.hash("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
        assert_eq!(
            passwords.verify("correct horse", &hash),
            Verified::Right { rehash: false }
        );
        assert_eq!(passwords.verify("wrong horse", &hash), Verified::Wrong);
        let stronger = Passwords::new(Argon2Cost {
            memory_kib: 128,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap();
        assert_eq!(
            stronger.verify("correct horse", &hash),
            Verified::Right { rehash: true },
            "a hash at another cost verifies and asks to be re-hashed"
        );
    }

    #[test]
    fn bcrypt_hashes_of_every_variant_verify_and_ask_for_a_rehash() {
        let passwords = cheap();
        let hash = bcrypt::hash("legacy-pass", 4).unwrap();
        for variant in ["$2a$", "$2b$", "$2y$"] {
            let hash = format!("{variant}{}", &hash[4..]);
            assert!(is_supported_hash(&hash));
            assert_eq!(
                passwords.verify("legacy-pass", &hash),
                Verified::Right { rehash: true },
                "{variant}"
            );
            assert_eq!(passwords.verify("other", &hash), Verified::Wrong);
        }
        assert_eq!(passwords.verify("x", "plain-text"), Verified::Wrong);
        assert!(!is_supported_hash("md5:abc"));
    }

    #[test]
    fn tokens_are_random_and_codes_are_six_digits() {
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        let code = six_digit_code();
        assert_eq!(code.len(), 6);
        assert!(code.bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(token_hash("abc").len(), 64);
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
    }

    #[test]
    fn derivations_are_stable_per_key_and_differ_across_keys() {
        let (k1, k2) = (Keyed::new(b"one"), Keyed::new(b"two"));
        assert_eq!(k1.successor("t"), k1.successor("t"));
        assert_ne!(k1.successor("t"), k2.successor("t"));
        assert_ne!(k1.successor("t"), k1.successor("u"));
        assert_ne!(
            k1.code_hash("a@x.io", "123456"),
            k1.code_hash("b@x.io", "123456")
        );
    }
}
