//! Encryption at rest: AES-256-GCM per message with a fresh random nonce, the
//! message's place bound as associated data, and a key id stored beside each
//! ciphertext so keys can rotate (new key for writes, old keys still read).
//!
//! What is bound has a format version stored with each row ([`Sealed::version`]):
//! version 1 (every new row) binds session id, message id, role, author and
//! sequence number, so a row whose fields were edited in the database fails to
//! open; version 0 (rows written before) bound the two ids only and still opens.
//! A v1 row relabelled as v0 fails too: the two associated data differ.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};

use crate::config::parse_encryption_key;

pub const NONCE_BYTES: usize = 12;

/// A message as stored: which key, which nonce, the ciphertext (with tag), and
/// which associated data it was sealed with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sealed {
    pub key_id: u32,
    #[serde(with = "serde_bytes")]
    pub nonce: [u8; NONCE_BYTES],
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The format of the associated data: [`AAD_IDS_ONLY`] or [`AAD_CURRENT`].
    pub version: u8,
}

/// Rows sealed before the format version existed: the two ids only.
pub const AAD_IDS_ONLY: u8 = 0;
/// The ids, role, author and sequence number.
pub const AAD_CURRENT: u8 = 1;

/// Where a message sits: what its associated data binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place<'a> {
    pub session_id: &'a str,
    pub message_id: &'a str,
    /// The role's stored name (`user`, `assistant`, ...).
    pub role: &'a str,
    pub author: &'a str,
    pub seq: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("no key with id {0:08x} is configured (was it removed from CHATBOX_ENCRYPTION_PREVIOUS_KEYS?)")]
    UnknownKey(u32),
    #[error("unknown sealing format version {0} (written by a newer build?)")]
    UnknownVersion(u8),
    #[error("ciphertext failed authentication (tampered, moved between rows, or wrong key)")]
    Tampered,
    #[error("{0}")]
    BadKey(String),
}

/// The current key and every previous key still readable.
pub struct KeyRing {
    current: u32,
    keys: HashMap<u32, Aes256Gcm>,
}

/// A key's id: the first four bytes of SHA-256 over a domain tag and the key. It
/// identifies a key without revealing it.
pub fn key_id(key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(b"chatbox key id v1");
    h.update(key);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Shows the key ids, never the keys.
impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<String> = self.keys.keys().map(|id| format!("{id:08x}")).collect();
        ids.sort();
        f.debug_struct("KeyRing")
            .field("current", &format_args!("{:08x}", self.current))
            .field("key_ids", &ids)
            .finish()
    }
}

impl KeyRing {
    /// `current` encrypts; `previous` (hex keys) only decrypt.
    pub fn new(current: &str, previous: &[String]) -> Result<KeyRing, CryptoError> {
        let cur = parse_encryption_key(current).map_err(CryptoError::BadKey)?;
        let current_id = key_id(&cur);
        let mut keys = HashMap::new();
        keys.insert(current_id, Aes256Gcm::new(&cur.into()));
        for p in previous {
            let k = parse_encryption_key(p)
                .map_err(|e| CryptoError::BadKey(format!("previous key: {e}")))?;
            keys.entry(key_id(&k))
                .or_insert_with(|| Aes256Gcm::new(&k.into()));
        }
        Ok(KeyRing {
            current: current_id,
            keys,
        })
    }

    pub fn current_key_id(&self) -> u32 {
        self.current
    }

    /// Associated data of format `version`: each field length-prefixed, so no
    /// two places collide; version 1 starts with a tag no version 0 data can
    /// equal, so relabelling a row's version makes it fail.
    fn aad(version: u8, at: &Place<'_>) -> Result<Vec<u8>, CryptoError> {
        let field = |aad: &mut Vec<u8>, s: &str| {
            aad.extend_from_slice(&(s.len() as u32).to_be_bytes());
            aad.extend_from_slice(s.as_bytes());
        };
        let mut aad = Vec::with_capacity(64 + at.session_id.len() + at.message_id.len());
        match version {
            AAD_IDS_ONLY => {
                field(&mut aad, at.session_id);
                field(&mut aad, at.message_id);
            }
            AAD_CURRENT => {
                aad.extend_from_slice(b"\xffchatbox aad v1");
                for s in [at.session_id, at.message_id, at.role, at.author] {
                    field(&mut aad, s);
                }
                aad.extend_from_slice(&at.seq.to_be_bytes());
            }
            v => return Err(CryptoError::UnknownVersion(v)),
        }
        Ok(aad)
    }

    /// Seals `plaintext` for its place, in the current format.
    pub fn seal(&self, at: &Place<'_>, plaintext: &str) -> Sealed {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let aad = Self::aad(AAD_CURRENT, at).expect("the current format is known");
        let cipher = &self.keys[&self.current];
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        Sealed {
            key_id: self.current,
            nonce,
            ciphertext,
            version: AAD_CURRENT,
        }
    }

    /// Seals bytes with key `key_id` (a file keeps the key it started with) and
    /// caller-built associated data: file chunks bind their file and place.
    pub fn seal_bytes(
        &self,
        key_id: u32,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<([u8; NONCE_BYTES], Vec<u8>), CryptoError> {
        let cipher = self
            .keys
            .get(&key_id)
            .ok_or(CryptoError::UnknownKey(key_id))?;
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Tampered)?;
        Ok((nonce, ciphertext))
    }

    /// Opens what [`KeyRing::seal_bytes`] sealed with the same associated data.
    pub fn open_bytes(
        &self,
        key_id: u32,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let cipher = self
            .keys
            .get(&key_id)
            .ok_or(CryptoError::UnknownKey(key_id))?;
        cipher
            .decrypt(
                &Nonce::from(*nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Tampered)
    }

    /// Opens a message sealed for `at`, in the format its row names. A row moved
    /// or edited (another place) fails with `Tampered`.
    pub fn open(&self, at: &Place<'_>, sealed: &Sealed) -> Result<String, CryptoError> {
        let cipher = self
            .keys
            .get(&sealed.key_id)
            .ok_or(CryptoError::UnknownKey(sealed.key_id))?;
        let aad = Self::aad(sealed.version, at)?;
        let plain = cipher
            .decrypt(
                &Nonce::from(sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Tampered)?;
        String::from_utf8(plain).map_err(|_| CryptoError::Tampered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new(&"11".repeat(32), &[]).unwrap()
    }

    fn at<'a>(session_id: &'a str, message_id: &'a str) -> Place<'a> {
        Place {
            session_id,
            message_id,
            role: "user",
            author: "u1",
            seq: 1,
        }
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let r = ring();
        let a = r.seal(&at("s1", "m1"), "hello");
        let b = r.seal(&at("s1", "m1"), "hello");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(a.version, AAD_CURRENT);
        assert!(!a.ciphertext.windows(5).any(|w| w == b"hello"));
        assert_eq!(r.open(&at("s1", "m1"), &a).unwrap(), "hello");
    }

    #[test]
    fn the_place_is_bound_and_tampering_is_detected() {
        let r = ring();
        let place = at("s1", "m1");
        let s = r.seal(&place, "hello");
        let moved = [
            ("another message", at("s1", "m2")),
            ("another session", at("s2", "m1")),
            (
                "another role",
                Place {
                    role: "admin",
                    ..place
                },
            ),
            (
                "another author",
                Place {
                    author: "u2",
                    ..place
                },
            ),
            ("another place in the session", Place { seq: 2, ..place }),
        ];
        for (what, other) in moved {
            assert_eq!(r.open(&other, &s), Err(CryptoError::Tampered), "{what}");
        }
        let mut t = s.clone();
        t.ciphertext[0] ^= 1;
        assert_eq!(r.open(&place, &t), Err(CryptoError::Tampered));
        let relabelled = Sealed {
            version: AAD_IDS_ONLY,
            ..s.clone()
        };
        assert_eq!(r.open(&place, &relabelled), Err(CryptoError::Tampered));
        let future = Sealed { version: 9, ..s };
        assert_eq!(r.open(&place, &future), Err(CryptoError::UnknownVersion(9)));
    }

    /// A row sealed before the format version existed: the two ids only, and
    /// no version stored (read as 0).
    fn sealed_the_old_way(r: &KeyRing, session_id: &str, message_id: &str, text: &str) -> Sealed {
        let mut aad = Vec::new();
        for s in [session_id, message_id] {
            aad.extend_from_slice(&(s.len() as u32).to_be_bytes());
            aad.extend_from_slice(s.as_bytes());
        }
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let ciphertext = r.keys[&r.current]
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: text.as_bytes(),
                    aad: &aad,
                },
            )
            .unwrap();
        Sealed {
            key_id: r.current,
            nonce,
            ciphertext,
            version: AAD_IDS_ONLY,
        }
    }

    #[test]
    fn rows_sealed_before_the_version_still_open() {
        let r = ring();
        let old = sealed_the_old_way(&r, "s1", "m1", "from before");
        // Whatever role, author and seq the row has: version 0 did not bind them.
        let place = Place {
            role: "assistant",
            author: "",
            seq: 7,
            ..at("s1", "m1")
        };
        assert_eq!(r.open(&place, &old).unwrap(), "from before");
        assert_eq!(r.open(&at("s1", "m2"), &old), Err(CryptoError::Tampered));
    }

    #[test]
    fn rotation_reads_old_writes_new() {
        let old = KeyRing::new(&"11".repeat(32), &[]).unwrap();
        let sealed_old = old.seal(&at("s", "m"), "before rotation");
        let new = KeyRing::new(&"22".repeat(32), &["11".repeat(32)]).unwrap();
        assert_eq!(
            new.open(&at("s", "m"), &sealed_old).unwrap(),
            "before rotation"
        );
        assert_ne!(new.seal(&at("s", "m"), "x").key_id, sealed_old.key_id);
        let forgotten = KeyRing::new(&"22".repeat(32), &[]).unwrap();
        assert_eq!(
            forgotten.open(&at("s", "m"), &sealed_old),
            Err(CryptoError::UnknownKey(sealed_old.key_id))
        );
    }

    #[test]
    fn the_documented_command_makes_an_accepted_key() {
        // `openssl rand -hex 32` prints 64 lowercase hex characters and a newline.
        let out = std::process::Command::new("openssl")
            .args(["rand", "-hex", "32"])
            .output();
        let key = match out {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap(),
            _ => format!("{}\n", hex::encode(rand::random::<[u8; 32]>())),
        };
        KeyRing::new(&key, &[]).expect("a key made as documented is accepted");
    }
}
