//! The module's values, valid by construction: the API parses a request into them once,
//! and the service only ever sees valid ones.

/// The longest title, in characters.
pub const TITLE_MAX: usize = 200;

/// An item's title: 1 to [`TITLE_MAX`] characters once trimmed, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Title(String);

impl Title {
    /// Trims `raw` and checks it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let title = raw.trim();
        if title.is_empty() {
            return Err("must not be blank".into());
        }
        if title.chars().count() > TITLE_MAX {
            return Err(format!("must have at most {TITLE_MAX} characters"));
        }
        if title.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(title.to_owned()))
    }

    /// The title.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A new item, as the service receives it.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// Its title.
    pub title: Title,
}

/// A stored item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Its id (a UUID v7: ids sort in creation order).
    pub id: String,
    /// Its title.
    pub title: String,
    /// When it was created, Unix milliseconds.
    pub created_at: i64,
}

/// One page of items.
#[derive(Debug, Clone)]
pub struct Page {
    /// The items, oldest first.
    pub items: Vec<Item>,
    /// Pass back to get the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use trellis_core::problem::Violations;

    use super::*;

    #[test]
    fn titles_are_trimmed_and_checked() {
        assert_eq!(
            Title::parse("  Milk  ").map(|t| t.as_str().to_owned()),
            Ok("Milk".into())
        );
        assert!(Title::parse("   ").is_err(), "blank");
        assert!(Title::parse("a\u{7}b").is_err(), "control character");
        assert!(Title::parse(&"x".repeat(TITLE_MAX)).is_ok());
        assert!(Title::parse(&"x".repeat(TITLE_MAX + 1)).is_err(), "too long");
    }

    #[test]
    fn violations_name_each_field() {
        let mut v = Violations::default();
        assert_eq!(v.check("title", Title::parse(" ")), None);
        assert_eq!(v.check("other", Ok(1)), Some(1));
        assert_eq!(v.0.len(), 1);
        assert_eq!(v.0[0].field, "/title");
    }
}
