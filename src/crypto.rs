//! Encryption at rest: AES-256-GCM per message with a fresh random nonce, the
//! session and message ids bound as associated data, and a key id stored beside
//! each ciphertext so keys can rotate (new key for writes, old keys still read).

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};

use crate::config::parse_encryption_key;

pub const NONCE_BYTES: usize = 12;

/// A message as stored: which key, which nonce, and the ciphertext (with tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: u32,
    pub nonce: [u8; NONCE_BYTES],
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("no key with id {0:08x} is configured (was it removed from CHATBOX_ENCRYPTION_PREVIOUS_KEYS?)")]
    UnknownKey(u32),
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

    /// Associated data: both ids, length-prefixed so no two pairs collide.
    fn aad(session_id: &str, message_id: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(8 + session_id.len() + message_id.len());
        aad.extend_from_slice(&(session_id.len() as u32).to_be_bytes());
        aad.extend_from_slice(session_id.as_bytes());
        aad.extend_from_slice(&(message_id.len() as u32).to_be_bytes());
        aad.extend_from_slice(message_id.as_bytes());
        aad
    }

    pub fn seal(&self, session_id: &str, message_id: &str, plaintext: &str) -> Sealed {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let aad = Self::aad(session_id, message_id);
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
        }
    }

    pub fn open(
        &self,
        session_id: &str,
        message_id: &str,
        sealed: &Sealed,
    ) -> Result<String, CryptoError> {
        let cipher = self
            .keys
            .get(&sealed.key_id)
            .ok_or(CryptoError::UnknownKey(sealed.key_id))?;
        let aad = Self::aad(session_id, message_id);
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

    #[test]
    fn round_trip_with_fresh_nonces() {
        let r = ring();
        let a = r.seal("s1", "m1", "hello");
        let b = r.seal("s1", "m1", "hello");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert!(!a.ciphertext.windows(5).any(|w| w == b"hello"));
        assert_eq!(r.open("s1", "m1", &a).unwrap(), "hello");
    }

    #[test]
    fn ids_are_bound_and_tampering_is_detected() {
        let r = ring();
        let s = r.seal("s1", "m1", "hello");
        assert_eq!(
            r.open("s1", "m2", &s),
            Err(CryptoError::Tampered),
            "moved to another message"
        );
        assert_eq!(
            r.open("s2", "m1", &s),
            Err(CryptoError::Tampered),
            "moved to another session"
        );
        let mut t = s.clone();
        t.ciphertext[0] ^= 1;
        assert_eq!(r.open("s1", "m1", &t), Err(CryptoError::Tampered));
    }

    #[test]
    fn rotation_reads_old_writes_new() {
        let old = KeyRing::new(&"11".repeat(32), &[]).unwrap();
        let sealed_old = old.seal("s", "m", "before rotation");
        let new = KeyRing::new(&"22".repeat(32), &["11".repeat(32)]).unwrap();
        assert_eq!(new.open("s", "m", &sealed_old).unwrap(), "before rotation");
        assert_ne!(new.seal("s", "m", "x").key_id, sealed_old.key_id);
        let forgotten = KeyRing::new(&"22".repeat(32), &[]).unwrap();
        assert_eq!(
            forgotten.open("s", "m", &sealed_old),
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
