//! Token primitives: HS256 access tokens (the algorithm is pinned: `none`, other HMAC
//! sizes and any asymmetric algorithm are refused) and opaque refresh tokens, of which
//! only a SHA-256 digest is stored.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::sync::{Arc, OnceLock};
use trellis_core::clock::Clock;

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

/// One HMAC key and its id, the `kid` written into the header of every token it signs.
#[derive(Clone)]
pub struct Key {
    id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Key {
    /// A key for `secret`. Its id is derived from the secret (a truncated SHA-256 under a
    /// fixed label), so every instance configured with the same secret names it alike and
    /// an operator needs to name nothing.
    pub fn new(secret: &[u8]) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"trellis jwt key id\0");
        hash.update(secret);
        Self {
            id: URL_SAFE_NO_PAD.encode(&hash.finalize()[..9]),
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The keys in use: one signs, all (the signing one included) verify. Rotation puts a new
/// key in front and keeps the old ones until the tokens they signed have expired.
#[derive(Clone)]
pub struct KeyRing {
    current: Key,
    previous: Vec<Key>,
}

impl KeyRing {
    /// `current` signs; `current` and `previous` verify.
    pub fn new(current: Key, previous: Vec<Key>) -> Self {
        Self { current, previous }
    }

    fn find(&self, id: &str) -> Option<&Key> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|key| key.id == id)
    }
}

/// Signs and checks access tokens.
///
/// Its keys are installed once the database is migrated ([`Signer::install`]): a key that
/// was generated on first start is read from there.
///
/// Tokens that passed the check are remembered (by their exact text, up to
/// [`VERIFIED_CAPACITY`] of them, for at most [`VERIFIED_FOR`]), so a client's next
/// requests skip the signature and the JSON decoding, which were a fifth of the CPU of an
/// authenticated read (tests/bench/RESULTS.md). Expiry is checked on every use. Only
/// accepted tokens are remembered, so a forged or altered token is always checked in full.
/// Expiry is read from the module's clock.
#[derive(Clone)]
pub struct Signer {
    keys: Arc<OnceLock<KeyRing>>,
    clock: Clock,
    validation: Validation,
    verified: moka::sync::Cache<String, Claims, foldhash::fast::RandomState>,
}

/// How many verified tokens are remembered.
pub const VERIFIED_CAPACITY: u64 = 10_000;
/// How long a verified token is remembered (it is still refused once expired).
pub const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(300);

impl Signer {
    /// A signer accepting only tokens from `issuer` that have not expired by `clock`,
    /// without keys yet.
    pub fn new(issuer: &str, clock: Clock) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
        // Checked against `clock` below, for every token, remembered or not.
        validation.validate_exp = false;
        validation.leeway = 5;
        Self {
            keys: Arc::default(),
            clock,
            validation,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_FOR)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    /// Installs the keys; the first installation wins.
    pub fn install(&self, keys: KeyRing) {
        let _ = self.keys.set(keys);
    }

    /// Signs `claims` with the current key, naming it in the header.
    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let keys = self
            .keys
            .get()
            .ok_or_else(|| anyhow::anyhow!("the signing keys are not loaded yet"))?;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(keys.current.id.clone());
        Ok(jsonwebtoken::encode(
            &header,
            claims,
            &keys.current.encoding,
        )?)
    }

    /// The claims of a valid token; `None` for anything malformed, forged, expired, from
    /// another issuer, signed with another algorithm or by a key that is not (or no longer)
    /// in the ring.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let now = self.clock.now_secs();
        if let Some(claims) = self.verified.get(token) {
            return self.unexpired(&claims, now).then_some(claims);
        }
        let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
        let key = self.keys.get()?.find(&kid)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation)
            .ok()?
            .claims;
        if !self.unexpired(&claims, now) {
            return None;
        }
        self.verified.insert(token.to_owned(), claims.clone());
        Some(claims)
    }
}

impl Signer {
    /// The expiry rule: refused once `exp` is more than the leeway ago.
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

    fn signer_with(issuer: &str, current: &[u8], previous: &[&[u8]]) -> Signer {
        let signer = Signer::new(issuer, Clock::system());
        signer.install(KeyRing::new(
            Key::new(current),
            previous.iter().map(|s| Key::new(s)).collect(),
        ));
        signer
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let signer = signer_with("trellis", &[7; 32], &[]);
        let token = signer.sign(&claims(far_future())).expect("sign");
        assert_eq!(signer.verify(&token), Some(claims(far_future())));
        let other = signer_with("trellis", &[8; 32], &[]);
        assert_eq!(other.verify(&token), None, "another secret");
        let other_issuer = signer_with("elsewhere", &[7; 32], &[]);
        assert_eq!(other_issuer.verify(&token), None, "another issuer");
        assert_eq!(signer.verify(&claims(10).sub), None, "garbage");
        let expired = signer.sign(&claims(10)).expect("sign");
        assert_eq!(signer.verify(&expired), None, "expired");
    }

    #[test]
    fn tokens_expire_by_the_module_clock_remembered_or_not() {
        let manual = trellis_core::clock::ManualClock::at(1_000_000_000_000);
        let signer = Signer::new("trellis", manual.clock());
        signer.install(KeyRing::new(Key::new(&[7; 32]), Vec::new()));
        let exp = manual.clock().now_secs() + 60;
        let token = signer.sign(&claims(exp)).expect("sign");
        assert_eq!(signer.verify(&token), Some(claims(exp)), "fresh");
        manual.advance(std::time::Duration::from_secs(66));
        assert_eq!(signer.verify(&token), None, "remembered, but expired");
        let other = Signer::new("trellis", manual.clock());
        other.install(KeyRing::new(Key::new(&[7; 32]), Vec::new()));
        assert_eq!(other.verify(&token), None, "checked in full, expired");
    }

    #[test]
    fn verified_tokens_are_remembered_but_still_expire() {
        let signer = signer_with("trellis", &[7; 32], &[]);
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
        let signer = signer_with("trellis", &secret, &[]);
        let mut header = Header::new(Algorithm::HS512);
        header.kid = Some(Key::new(&secret).id().to_owned());
        let hs512 = jsonwebtoken::encode(
            &header,
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
    fn rotated_keys_verify_until_removed_and_only_the_current_one_signs() {
        let (old, new) = ([1; 32], [2; 32]);
        let before = signer_with("trellis", &old, &[]);
        let old_token = before.sign(&claims(far_future())).expect("sign");
        let rotated = signer_with("trellis", &new, &[&old]);
        assert_eq!(rotated.verify(&old_token), Some(claims(far_future())));
        let new_token = rotated.sign(&claims(far_future())).expect("sign");
        let kid = |t: &str| jsonwebtoken::decode_header(t).expect("header").kid;
        assert_eq!(kid(&new_token).as_deref(), Some(Key::new(&new).id()));
        assert_ne!(kid(&new_token), kid(&old_token));
        let after = signer_with("trellis", &new, &[]);
        assert_eq!(after.verify(&old_token), None, "the old key was removed");
        assert_eq!(after.verify(&new_token), Some(claims(far_future())));
    }

    #[test]
    fn tokens_without_a_known_key_id_are_refused() {
        let secret = [7; 32];
        let signer = signer_with("trellis", &secret, &[]);
        let unnamed = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(far_future()),
            &EncodingKey::from_secret(&secret),
        )
        .expect("sign");
        assert_eq!(signer.verify(&unnamed), None, "no kid");
        assert_eq!(
            Signer::new("trellis", Clock::system())
                .verify(&signer.sign(&claims(far_future())).expect("sign")),
            None,
            "no keys installed"
        );
    }

    #[test]
    fn refresh_tokens_are_random_and_digested() {
        let (a, b) = (new_refresh_token(), new_refresh_token());
        assert_ne!(a, b);
        assert_eq!(digest(&a).len(), 64);
        assert_ne!(digest(&a), a);
    }
}
