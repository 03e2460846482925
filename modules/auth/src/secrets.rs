//! Which signing secrets are refused.
//!
//! A configured secret is an HMAC-SHA256 key, so it needs as much entropy as the hash
//! (ASVS 6.4 / OWASP JSON Web Token Cheat Sheet: at least 256 bits from a secure random
//! source). Values published with Trellis, and values a person would type, are refused
//! with a message saying what to do instead. With no secret configured the module
//! generates one on first start and keeps it in its database, so nothing here is ever a
//! fallback.

/// The development secret earlier Trellis versions shipped in their source: refused
/// everywhere, since anyone can read it.
pub const OLD_DEV_SECRET: &str = "dev-only-secret-change-me-before-deploying-trellis";
/// The secret of the `test` profile (config/test.toml): refused in every other profile.
pub const TEST_PROFILE_SECRET: &str = "test-profile-secret-not-for-production-0123456789";

/// Words that give away a typed secret.
const GIVEAWAYS: &[&str] = &[
    "secret",
    "password",
    "passw0rd",
    "changeme",
    "change-me",
    "example",
    "trellis",
    "jwt",
    "qwerty",
    "letmein",
    "default",
];

/// Why `secret` (the value of the key `key`) may not sign tokens in `profile`, if it may
/// not.
pub fn refusal(key: &str, secret: &str, profile: &str) -> Option<String> {
    let advice = "use 32 random bytes, e.g. `openssl rand -base64 32`, or leave it empty \
                  to have one generated and stored in the database";
    if secret == TEST_PROFILE_SECRET {
        return (profile != "test")
            .then(|| format!("`{key}` is the `test` profile's published secret; {advice}"));
    }
    if secret == OLD_DEV_SECRET {
        return Some(format!(
            "`{key}` is the development secret published in Trellis's source; {advice}"
        ));
    }
    if secret.len() < 32 {
        return Some(format!("`{key}` must be at least 32 bytes; {advice}"));
    }
    let mut distinct: Vec<char> = secret.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 8 {
        return Some(format!(
            "`{key}` repeats too few characters ({}) to be random; {advice}",
            distinct.len()
        ));
    }
    let lower = secret.to_lowercase();
    let phrase = secret
        .chars()
        .all(|c| c.is_alphabetic() || matches!(c, ' ' | '-' | '_' | '.' | ',' | '\''));
    if phrase || GIVEAWAYS.iter().any(|word| lower.contains(word)) {
        return Some(format!(
            "`{key}` looks like a phrase or a placeholder, not a random key; {advice}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "modules.auth.jwt_secret";

    #[test]
    fn published_and_weak_secrets_are_refused() {
        for (secret, why) in [
            (OLD_DEV_SECRET, "published in Trellis's source"),
            ("short-but-random-Zq8#", "at least 32 bytes"),
            (&"a".repeat(64), "too few characters"),
            (&"ab12".repeat(16), "too few characters"),
            ("correct horse battery staple and then some", "phrase"),
            ("Correct-Horse-Battery-Staple-Correct-Horse", "phrase"),
            ("my-super-secret-key-for-production-2026!", "placeholder"),
        ] {
            let refusal = refusal(KEY, secret, "production").unwrap_or_default();
            assert!(refusal.contains(why), "{secret:?}: {refusal:?}");
            assert!(refusal.contains(KEY), "names the key: {refusal}");
        }
    }

    #[test]
    fn the_test_profile_secret_is_refused_outside_the_test_profile() {
        assert_eq!(refusal(KEY, TEST_PROFILE_SECRET, "test"), None);
        for profile in ["dev", "production", "staging"] {
            assert!(
                refusal(KEY, TEST_PROFILE_SECRET, profile).is_some(),
                "{profile}"
            );
        }
    }

    #[test]
    fn random_secrets_are_accepted() {
        for secret in [
            "3q2+7wAAAAC0hVmFp0Y1yJvG9Rk+o8tM1nqW5x2LJzA=",
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        ] {
            assert_eq!(refusal(KEY, secret, "production"), None, "{secret}");
        }
    }

    #[test]
    fn the_committed_test_profile_secret_is_the_one_refused_elsewhere() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/test.toml"),
        )
        .expect("config/test.toml");
        assert!(
            text.contains(&format!("jwt_secret = \"{TEST_PROFILE_SECRET}\"")),
            "config/test.toml's secret and TEST_PROFILE_SECRET must agree"
        );
    }
}
