//! What a user sends beside a message's text (`file_url`, `metadata`): carried
//! with it, sealed like its content, shown in history, transcripts and exports.

use serde::Serialize;

use crate::crypto::{CryptoError, KeyRing, Place};
use crate::store::{MessageRecord, EXTRA_PLACE_SUFFIX};

/// A message's extras; empty for most messages (then nothing is stored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Extra {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_url: Option<String>,
    /// A JSON object, validated (size, depth) by the frame parser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

impl Extra {
    /// From a `user_message`'s validated fields (`metadata` as compact JSON);
    /// `None` when it has neither.
    pub fn from_frame(file_url: Option<String>, metadata: Option<String>) -> Option<Extra> {
        let metadata = metadata.and_then(|m| serde_json::from_str(&m).ok());
        (file_url.is_some() || metadata.is_some()).then_some(Extra { file_url, metadata })
    }

    /// Sealed for the message at `at` (its place, with [`EXTRA_PLACE_SUFFIX`]):
    /// nonce then ciphertext, as [`MessageRecord::extra`] keeps it.
    pub fn seal(&self, keys: &KeyRing, at: &Place<'_>) -> Vec<u8> {
        let message_id = format!("{}{EXTRA_PLACE_SUFFIX}", at.message_id);
        let place = Place {
            message_id: &message_id,
            ..*at
        };
        // Serialising strings and a JSON value cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        let sealed = keys.seal(&place, &json);
        [&sealed.nonce[..], &sealed.ciphertext].concat()
    }

    /// The extras of a stored message: empty when it has none; an error when they
    /// fail their integrity check (the message is then withheld like a tampered
    /// one).
    pub fn open(keys: &KeyRing, m: &MessageRecord) -> Result<Extra, CryptoError> {
        if m.extra.is_none() {
            return Ok(Extra::default());
        }
        let sealed = m.extra_sealed().ok_or(CryptoError::Tampered)?;
        let message_id = format!("{}{EXTRA_PLACE_SUFFIX}", m.message_id);
        let place = Place {
            message_id: &message_id,
            ..m.place()
        };
        let json = keys.open(&place, &sealed)?;
        serde_json::from_str(&json).map_err(|_| CryptoError::Tampered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Role;

    /// A stored user message `id` of session `s1`, its content sealed.
    fn message(keys: &KeyRing, id: &str) -> MessageRecord {
        let place = Place {
            session_id: "s1",
            message_id: id,
            role: "user",
            author: "u1",
            seq: 3,
        };
        MessageRecord {
            session_id: "s1".into(),
            message_id: id.into(),
            seq: 3,
            role: Role::User,
            author: "u1".into(),
            client_id: None,
            sealed: keys.seal(&place, "hello"),
            created_at: 0,
            tokens_in: 0,
            tokens_out: 0,
            cancelled: false,
            file: None,
            extra: None,
        }
    }

    #[test]
    fn extras_are_sealed_for_their_message_and_nowhere_else() {
        let keys = KeyRing::new(&"11".repeat(32), &[]).expect("valid key");
        let extra = Extra::from_frame(
            Some("https://shop.example/order/42".into()),
            Some(r#"{"plan":"pro","page":"/billing"}"#.into()),
        )
        .expect("has extras");
        let mut m = message(&keys, "m1");
        let blob = extra.seal(&keys, &m.place());
        assert!(!blob.windows(12).any(|w| w == b"shop.example"), "sealed");
        m.extra = Some(blob.clone());
        assert_eq!(Extra::open(&keys, &m), Ok(extra));
        // Moved to another message, or passed off as the content: refused.
        let mut moved = message(&keys, "m2");
        moved.extra = Some(blob);
        assert!(Extra::open(&keys, &moved).is_err());
        let as_content = m.extra_sealed().expect("sealed extras");
        assert!(keys.open(&m.place(), &as_content).is_err());
        m.extra = Some(vec![1, 2, 3]);
        assert!(Extra::open(&keys, &m).is_err(), "too short to be sealed");
        assert_eq!(Extra::from_frame(None, None), None);
        m.extra = None;
        assert_eq!(Extra::open(&keys, &m), Ok(Extra::default()));
    }
}
