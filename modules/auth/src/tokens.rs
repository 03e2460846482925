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
#[derive(Clone)]
pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

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
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()
            .map(|data| data.claims)
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
