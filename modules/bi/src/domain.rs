//! BI events as they leave the server, and the rules every event obeys.

use std::{collections::BTreeMap, time::SystemTime};

use serde::Serialize;
use serde_json::Value;
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};
use trellis_core::contracts::{
    LoginFailed, PasswordChanged, SessionRevoked, UserDeleted, UserLoggedIn, UserRegistered,
    UserUpdated,
};

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `POST /api/v1/bi/events`.
    Client,
    /// A domain event of another module.
    Server,
}

/// UTM attribution.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Utm {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub medium: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// An event as a client sent it (shape already checked by the api layer).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientEvent {
    pub name: String,
    pub timestamp: Option<OffsetDateTime>,
    pub properties: BTreeMap<String, Value>,
    pub utm: Option<Utm>,
}

/// A BI event, enriched: the body of its message-queue message, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BiEvent {
    /// A UUIDv7, unique per event.
    pub id: String,
    pub name: String,
    pub source: Source,
    /// The client's clock, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// The server's clock when the event was accepted, RFC 3339 with milliseconds.
    pub received_at: String,
    /// The request that carried (or caused) the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The W3C `traceparent` of the span that accepted it (with traces on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The authenticated caller (client events) or the user concerned (server events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The caller's session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub properties: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm: Option<Utm>,
}

/// Who sent a request, which request, and when it arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    /// RFC 3339 with milliseconds; one instant for every event of a request.
    pub received_at: String,
}

/// Now, as [`Origin::received_at`] writes it.
pub fn received_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `ms` since the Unix epoch, in the format of [`received_now`].
pub fn rfc3339_millis(ms: i64) -> String {
    let at = SystemTime::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or_default());
    humantime::format_rfc3339_millis(at).to_string()
}

impl BiEvent {
    /// A fresh id and the time of acceptance.
    pub fn enrich(
        name: String,
        source: Source,
        timestamp: Option<String>,
        properties: BTreeMap<String, Value>,
        utm: Option<Utm>,
        origin: Origin,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            name,
            source,
            timestamp,
            received_at: origin.received_at,
            request_id: origin.request_id,
            traceparent: origin.traceparent,
            user_id: origin.user_id,
            session_id: origin.session_id,
            properties,
            utm,
        }
    }
}

/// `time` in UTC, RFC 3339 (`2026-11-24T10:00:00.25Z`); kept in its own offset when UTC
/// is out of range.
pub fn utc_rfc3339(time: OffsetDateTime) -> String {
    let time = time.checked_to_offset(UtcOffset::UTC).unwrap_or(time);
    time.format(&Rfc3339).unwrap_or_default()
}

/// The size of `properties` as compact JSON, in bytes.
pub fn json_size(properties: &BTreeMap<String, Value>) -> usize {
    let mut count = ByteCount(0);
    serde_json::to_writer(&mut count, properties).map_or(usize::MAX, |()| count.0)
}

/// Counts what is written, keeping nothing.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A domain event of another module that becomes a BI event of the same name.
pub trait Internal: trellis_core::events::Event {
    /// The user concerned, if known.
    fn user_id(&self) -> Option<&str>;
    /// Properties (never personal data such as e-mail addresses).
    fn properties(&self) -> BTreeMap<String, Value> {
        BTreeMap::new()
    }
}

fn one(key: &str, value: impl Into<Value>) -> BTreeMap<String, Value> {
    BTreeMap::from([(key.to_owned(), value.into())])
}

impl Internal for UserRegistered {
    fn user_id(&self) -> Option<&str> {
        Some(&self.user_id)
    }
}

impl Internal for UserUpdated {
    fn user_id(&self) -> Option<&str> {
        Some(&self.user_id)
    }
    fn properties(&self) -> BTreeMap<String, Value> {
        one("fields", self.fields.clone())
    }
}

impl Internal for UserDeleted {
    fn user_id(&self) -> Option<&str> {
        Some(&self.user_id)
    }
}

impl Internal for PasswordChanged {
    fn user_id(&self) -> Option<&str> {
        Some(&self.user_id)
    }
}

impl Internal for UserLoggedIn {
    fn user_id(&self) -> Option<&str> {
        Some(&self.user_id)
    }
}

impl Internal for LoginFailed {
    fn user_id(&self) -> Option<&str> {
        None
    }
    fn properties(&self) -> BTreeMap<String, Value> {
        one("reason", self.reason.as_str())
    }
}

impl Internal for SessionRevoked {
    fn user_id(&self) -> Option<&str> {
        Some(&self.user_id)
    }
    fn properties(&self) -> BTreeMap<String, Value> {
        one("reason", self.reason.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_times_are_written_in_utc() {
        let time =
            OffsetDateTime::parse("2026-11-24T11:00:00.250+01:00", &Rfc3339).expect("parses");
        assert_eq!(utc_rfc3339(time), "2026-11-24T10:00:00.25Z");
        let edge = OffsetDateTime::parse("9999-12-31T23:59:59-01:00", &Rfc3339).expect("parses");
        assert_eq!(utc_rfc3339(edge), "9999-12-31T23:59:59-01:00");
    }

    #[test]
    fn properties_size_is_measured_as_compact_json() {
        let props = one("k", "v"); // {"k":"v"} = 9 bytes
        assert_eq!(json_size(&props), 9);
        assert_eq!(json_size(&BTreeMap::new()), 2);
    }

    #[test]
    fn the_message_body_carries_the_id_and_leaves_out_what_is_unknown() {
        let event = BiEvent::enrich(
            "page.view".into(),
            Source::Client,
            None,
            one("path", "/"),
            None,
            Origin {
                request_id: Some("r1".into()),
                ..Origin::default()
            },
        );
        let body = serde_json::to_value(&event).expect("serialises");
        assert_eq!(body["id"], event.id.as_str());
        assert_eq!(body["source"], "client");
        assert_eq!(body["request_id"], "r1");
        assert!(body.get("user_id").is_none() && body.get("utm").is_none());
    }
}
