//! Token primitives: HS256 access tokens (the algorithm is pinned: `none`, other HMAC
//! sizes and any asymmetric algorithm are refused) and opaque refresh tokens, of which
//! only a SHA-256 digest is stored.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Access token claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The session id.
    pub sid: String,
    /// Issued at (seconds).
    pub iat: u64,
    /// Expires at (seconds).
    pub exp: u64,
    /// Issuer.
    pub iss: String,
}

/// Signs and checks access tokens.
///
/// Tokens that passed the check are remembered (by their exact text, up to
/// [`VERIFIED_CAPACITY`] of them, for at most [`VERIFIED_FOR`]), so a client's next
/// requests skip the signature and the JSON decoding, which were a fifth of the CPU of an
/// authenticated read (tests/bench/RESULTS.md). Expiry is checked on every use. Only
/// accepted tokens are remembered, so a forged or altered token is always checked in full.
#[derive(Clone)]
pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    verified: moka::sync::Cache<String, Claims, foldhash::fast::RandomState>,
}

/// How many verified tokens are remembered.
pub const VERIFIED_CAPACITY: u64 = 10_000;
/// How long a verified token is remembered (it is still refused once expired).
pub const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(300);

impl Signer {
    /// A signer for `secret`, accepting only tokens from `issuer`.
    pub fn new(secret: &[u8], issuer: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_FOR)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &self.encoding,
        )?)
    }

    /// The claims of a valid token; `None` for anything malformed, forged, expired, from
    /// another issuer or signed with another algorithm.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        if let Some(claims) = self.verified.get(token) {
            return self
                .unexpired(&claims, jsonwebtoken::get_current_timestamp())
                .then_some(claims);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()?
            .claims;
        self.verified.insert(token.to_owned(), claims.clone());
        Some(claims)
    }
}

impl Signer {
    /// The expiry rule of the full check: refused once `exp` is more than the leeway ago.
    fn unexpired(&self, claims: &Claims, now: u64) -> bool {
        claims.exp.saturating_add(self.validation.leeway) >= now
    }
}

/// A new opaque refresh token (256 random bits).
pub fn new_refresh_token() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What is stored of a refresh token.
pub fn digest(token: &str) -> String {
    let hash = Sha256::digest(token.as_bytes());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "u".into(),
            sid: "s".into(),
            iat: 1,
            exp,
            iss: "trellis".into(),
        }
    }

    fn far_future() -> u64 {
        4_000_000_000
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let signer = Signer::new(&[7; 32], "trellis");
        let token = signer.sign(&claims(far_future())).expect("sign");
        assert_eq!(signer.verify(&token), Some(claims(far_future())));
        let other = Signer::new(&[8; 32], "trellis");
        assert_eq!(other.verify(&token), None, "another secret");
        let other_issuer = Signer::new(&[7; 32], "elsewhere");
        assert_eq!(other_issuer.verify(&token), None, "another issuer");
        assert_eq!(signer.verify(&claims(10).sub), None, "garbage");
        let expired = signer.sign(&claims(10)).expect("sign");
        assert_eq!(signer.verify(&expired), None, "expired");
    }

    #[test]
    fn verified_tokens_are_remembered_but_still_expire() {
        let signer = Signer::new(&[7; 32], "trellis");
        let now = jsonwebtoken::get_current_timestamp();
        let token = signer.sign(&claims(now + 100)).expect("sign");
        assert_eq!(signer.verify(&token), Some(claims(now + 100)));
        assert!(signer.verified.contains_key(&token));
        assert_eq!(
            signer.verify(&token),
            Some(claims(now + 100)),
            "from memory"
        );
        assert!(
            signer.unexpired(&claims(now + 100), now + 105),
            "within the leeway"
        );
        assert!(!signer.unexpired(&claims(now + 100), now + 106));

        let (signed, signature) = token.rsplit_once('.').expect("three parts");
        let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
        let tampered = format!("{signed}.{flipped}{}", &signature[1..]);
        assert_eq!(signer.verify(&tampered), None);
        assert!(
            !signer.verified.contains_key(&tampered),
            "refused tokens are not kept"
        );
    }

    #[test]
    fn other_algorithms_are_refused() {
        let secret = [7; 32];
        let signer = Signer::new(&secret, "trellis");
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims(far_future()),
            &EncodingKey::from_secret(&secret),
        )
        .expect("sign");
        assert_eq!(signer.verify(&hs512), None, "HS512 with the right secret");
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(far_future())).expect("json"));
        let none = format!(
            "{}.{payload}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
        );
        assert_eq!(signer.verify(&none), None, "alg none");
    }

    #[test]
    fn refresh_tokens_are_random_and_digested() {
        let (a, b) = (new_refresh_token(), new_refresh_token());
        assert_ne!(a, b);
        assert_eq!(digest(&a).len(), 64);
        assert_ne!(digest(&a), a);
    }
}
