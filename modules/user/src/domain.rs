//! Parsed user input: once a value has one of these types, it is valid.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A normalised (trimmed, lower-case) e-mail address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Parses an address: 3 to 254 characters, one `@`, a dotted domain, no spaces.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let email = raw.trim().to_lowercase();
        let valid_chars = email.chars().all(|c| {
            c.is_ascii_graphic() || !c.is_ascii() && !c.is_control() && !c.is_whitespace()
        });
        let Some((local, domain)) = email.split_once('@') else {
            return Err("must be an e-mail address".into());
        };
        let ok = (3..=254).contains(&email.chars().count())
            && valid_chars
            && !local.is_empty()
            && local.chars().count() <= 64
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..");
        if ok {
            Ok(Self(email))
        } else {
            Err("must be an e-mail address".into())
        }
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password as typed: 8 to 128 characters. Never printed.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// 8 to 128 characters, not only spaces; the upper bound keeps hashing cost bounded.
    pub fn parse(raw: String) -> Result<Self, String> {
        let len = raw.chars().count();
        if len < 8 {
            Err("must be at least 8 characters".into())
        } else if len > 128 {
            Err("must be at most 128 characters".into())
        } else if raw.trim().is_empty() {
            Err("must not be only spaces".into())
        } else {
            Ok(Self(raw))
        }
    }

    /// The secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A first or last name: 1 to 100 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonName(String);

impl PersonName {
    /// Parses a name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let name = raw.trim();
        let len = name.chars().count();
        if len == 0 {
            Err("must not be empty".into())
        } else if len > 100 {
            Err("must be at most 100 characters".into())
        } else if name.chars().any(char::is_control) {
            Err("must not contain control characters".into())
        } else {
            Ok(Self(name.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One UTM attribution value: at most 200 characters, no control characters; empty
/// means absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UtmValue(Option<String>);

impl UtmValue {
    /// Parses an optional value.
    pub fn parse(raw: Option<&str>) -> Result<Self, String> {
        let Some(value) = raw.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(Self(None));
        };
        if value.chars().count() > 200 {
            Err("must be at most 200 characters".into())
        } else if value.chars().any(char::is_control) {
            Err("must not contain control characters".into())
        } else {
            Ok(Self(Some(value.to_owned())))
        }
    }

    /// The value, if any.
    pub fn into_inner(self) -> Option<String> {
        self.0
    }
}

/// A new account.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// E-mail.
    pub email: Email,
    /// Password.
    pub password: Password,
    /// First name.
    pub first_name: PersonName,
    /// Last name.
    pub last_name: PersonName,
}

/// Changes to a profile; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    /// New e-mail.
    pub email: Option<Email>,
    /// New first name.
    pub first_name: Option<PersonName>,
    /// New last name.
    pub last_name: Option<PersonName>,
}

impl UserChanges {
    /// Names of the fields that change.
    pub fn fields(&self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.email.is_some() {
            fields.push("email");
        }
        if self.first_name.is_some() {
            fields.push("first_name");
        }
        if self.last_name.is_some() {
            fields.push("last_name");
        }
        fields
    }
}

/// UTM attribution.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Details {
    /// `utm_source`.
    pub source: Option<String>,
    /// `utm_campaign`.
    pub campaign: Option<String>,
    /// `utm_medium`.
    pub medium: Option<String>,
    /// `utm_content`.
    pub content: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            Email::parse("  Alice@Example.COM ").map(|e| e.0),
            Ok("alice@example.com".into())
        );
        for bad in [
            "", "alice", "a@b", "a@@b.c", "a b@c.d", "@c.d", "a@.c", "a@c.", "a@c..d",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn passwords_have_length_limits_and_never_print() {
        assert!(Password::parse("short".into()).is_err());
        assert!(Password::parse("x".repeat(129)).is_err());
        assert!(Password::parse("        ".into()).is_err());
        let ok = Password::parse("correct horse".into()).expect("valid");
        assert_eq!(format!("{ok:?}"), "Password(***)");
    }

    #[test]
    fn names_and_utm_values_are_bounded() {
        assert!(PersonName::parse("  ").is_err());
        assert!(PersonName::parse(&"n".repeat(101)).is_err());
        assert_eq!(PersonName::parse(" Ada ").map(|n| n.0), Ok("Ada".into()));
        assert_eq!(UtmValue::parse(Some("  ")), Ok(UtmValue(None)));
        assert!(UtmValue::parse(Some(&"u".repeat(201))).is_err());
    }
}

/// An account as the service sees it (without its password hash); what the repository
/// loads and the cache keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Id.
    pub id: String,
    /// E-mail.
    pub email: String,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}
