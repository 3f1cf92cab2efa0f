//! JWT verification (HS256 only, `exp` required, `nbf` honoured, issuer and audience
//! checked when configured) and token minting for `--dev`.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Longest user id accepted from a token; ids end up in logs, keys and metrics.
pub const USER_ID_CHARS_MAX: usize = 128;
/// Longest display name kept; longer names are cut, not refused.
pub const NAME_CHARS_MAX: usize = 64;
/// Roles a token may carry; more is a malformed token.
const ROLES_MAX: usize = 16;

/// Claims of a chatbox token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub exp: u64,
}

/// The authenticated caller, as the rest of the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Arc<str>,
    pub name: Arc<str>,
    pub admin: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    /// `nbf` is still in the future.
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Clock skew tolerated on `exp` and `nbf` unless configured otherwise.
pub const LEEWAY_SECS_DEFAULT: u64 = 5;

/// What a token must carry besides a good signature, `sub` and `exp`.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// `iss` must be present and equal this.
    pub issuer: Option<String>,
    /// `aud` must be present and contain this. Unset, a token carrying `aud` is
    /// refused (RFC 7519 4.1.3: a recipient not named in `aud` rejects it).
    pub audience: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf` when a token is verified.
    pub leeway_secs: u64,
}

/// Verifies tokens with one pinned algorithm and secret. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

/// Shows how tokens are checked, never the secret.
impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway", &self.validation.leeway)
            .field("secret", &format_args!("{}", crate::secret::MASK))
            .finish()
    }
}

impl Verifier {
    /// A verifier with the default checks (no issuer, no audience, default leeway).
    pub fn new(secret: &[u8]) -> Self {
        Self::with_checks(
            secret,
            &Checks {
                leeway_secs: LEEWAY_SECS_DEFAULT,
                ..Checks::default()
            },
        )
    }

    pub fn with_checks(secret: &[u8], checks: &Checks) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &checks.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &checks.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = checks.leeway_secs;
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_until(token).map(|(identity, _)| identity)
    }

    /// Verifies a token and also returns its `exp` (Unix seconds): a connection
    /// opened with it lives until then.
    pub fn verify_until(&self, token: &str) -> Result<(Identity, u64), AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not allowed".into()),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Invalid(format!("missing claim {c}"))
                }
                _ => AuthError::Invalid("malformed token".into()),
            },
        )?;
        let c = data.claims;
        let exp = c.exp;
        if c.sub.is_empty() || c.sub.chars().count() > USER_ID_CHARS_MAX {
            return Err(AuthError::Invalid(format!(
                "sub must be 1..={USER_ID_CHARS_MAX} characters"
            )));
        }
        if c.sub.chars().any(char::is_control) {
            return Err(AuthError::Invalid("sub contains control characters".into()));
        }
        if c.roles.len() > ROLES_MAX {
            return Err(AuthError::Invalid("too many roles".into()));
        }
        let name: String = c
            .name
            .as_deref()
            .unwrap_or(&c.sub)
            .chars()
            .filter(|ch| !ch.is_control())
            .take(NAME_CHARS_MAX)
            .collect();
        let user_id: Arc<str> = c.sub.into();
        // Without a name claim the name is the id: one allocation, not two, on every
        // connection.
        let name = if *name == *user_id {
            user_id.clone()
        } else {
            name.into()
        };
        let identity = Identity {
            admin: c.roles.iter().any(|r| r == "admin"),
            user_id,
            name,
        };
        Ok((identity, exp))
    }
}

/// Signs a token (HS256). Used by `--dev` and by tests.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of plain claims cannot fail")
}

pub use crate::clock::now_secs;

/// The token of an `Authorization: Bearer <token>` header value (the scheme is
/// case-insensitive); `None` for any other scheme or an empty token.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn bearer_takes_the_token_of_the_bearer_scheme_only() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    fn claims(sub: &str, exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            name: Some("Ann".into()),
            roles: vec!["admin".into()],
            exp,
        }
    }

    #[test]
    fn accepts_a_good_token() {
        let v = Verifier::new(SECRET);
        let id = v
            .verify(&mint(SECRET, &claims("u1", now_secs() + 60)))
            .unwrap();
        assert_eq!(&*id.user_id, "u1");
        assert_eq!(&*id.name, "Ann");
        assert!(id.admin);
    }

    #[test]
    fn refuses_expired_bad_signature_and_other_algorithms() {
        let v = Verifier::new(SECRET);
        let expired = mint(SECRET, &claims("u1", now_secs() - 3600));
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        let other = mint(
            b"another secret that is long enough!!",
            &claims("u1", now_secs() + 60),
        );
        assert!(matches!(v.verify(&other), Err(AuthError::Invalid(_))));
        // alg "none": header {"alg":"none"} with no signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64url(&format!("{{\"sub\":\"u1\",\"exp\":{}}}", now_secs() + 60))
        );
        assert!(v.verify(&none).is_err());
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims("u1", now_secs() + 60),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            v.verify(&hs512),
            Err(AuthError::Invalid("algorithm not allowed".into()))
        );
    }

    #[test]
    fn refuses_missing_exp_and_oversized_sub() {
        let v = Verifier::new(SECRET);
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u1"}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(v.verify(&no_exp).is_err());
        let long = mint(
            SECRET,
            &claims(&"x".repeat(USER_ID_CHARS_MAX + 1), now_secs() + 60),
        );
        assert!(v.verify(&long).is_err());
    }

    #[test]
    fn caps_the_display_name() {
        let v = Verifier::new(SECRET);
        let mut c = claims("u1", now_secs() + 60);
        c.name = Some("n".repeat(500));
        assert_eq!(
            v.verify(&mint(SECRET, &c)).unwrap().name.chars().count(),
            NAME_CHARS_MAX
        );
    }

    fn signed(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn refuses_a_token_not_yet_valid() {
        let v = Verifier::new(SECRET);
        let now = now_secs();
        let later = signed(serde_json::json!({"sub": "u1", "exp": now + 600, "nbf": now + 120}));
        assert_eq!(v.verify(&later), Err(AuthError::NotYetValid));
        let ready = signed(serde_json::json!({"sub": "u1", "exp": now + 600, "nbf": now}));
        assert!(v.verify(&ready).is_ok());
    }

    #[test]
    fn returns_the_expiry() {
        let v = Verifier::new(SECRET);
        let exp = now_secs() + 42;
        let (id, until) = v.verify_until(&mint(SECRET, &claims("u1", exp))).unwrap();
        assert_eq!((&*id.user_id, until), ("u1", exp));
    }

    #[test]
    fn checks_issuer_and_audience_when_set() {
        let exp = now_secs() + 600;
        let checks = Checks {
            issuer: Some("https://id.example".into()),
            audience: Some("chatbox".into()),
            leeway_secs: 0,
        };
        let v = Verifier::with_checks(SECRET, &checks);
        let ok = |c: serde_json::Value| v.verify(&signed(c)).is_ok();
        assert!(ok(
            serde_json::json!({"sub": "u", "exp": exp, "iss": "https://id.example", "aud": "chatbox"})
        ));
        assert!(ok(
            serde_json::json!({"sub": "u", "exp": exp, "iss": "https://id.example", "aud": ["other", "chatbox"]})
        ));
        assert!(!ok(
            serde_json::json!({"sub": "u", "exp": exp, "iss": "https://evil.example", "aud": "chatbox"})
        ));
        assert!(
            !ok(serde_json::json!({"sub": "u", "exp": exp, "aud": "chatbox"})),
            "iss required"
        );
        assert!(!ok(
            serde_json::json!({"sub": "u", "exp": exp, "iss": "https://id.example", "aud": "other"})
        ));
        assert!(
            !ok(serde_json::json!({"sub": "u", "exp": exp, "iss": "https://id.example"})),
            "aud required"
        );

        // Unset, nothing is required; a token naming an audience is not for us.
        let plain = Verifier::new(SECRET);
        assert!(plain
            .verify(&signed(
                serde_json::json!({"sub": "u", "exp": exp, "iss": "x"})
            ))
            .is_ok());
        assert!(plain
            .verify(&signed(
                serde_json::json!({"sub": "u", "exp": exp, "aud": "x"})
            ))
            .is_err());
    }

    fn base64url(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, &x| acc << 8 | x as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}
