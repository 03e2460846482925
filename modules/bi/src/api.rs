//! HTTP surface of the bi module: `POST /api/v1/bi/events`.

use std::{borrow::Cow, collections::BTreeMap};

use poem::Request;
use poem_openapi::{
    ApiResponse, Object, OpenApi,
    payload::Json,
    registry::{MetaSchema, MetaSchemaRef, Registry},
    types::{ParseError, ParseFromJSON, ParseResult, Type},
};
use serde::{
    Deserialize, Deserializer,
    de::{
        MapAccess, SeqAccess, Visitor,
        value::{MapAccessDeserializer, SeqAccessDeserializer},
    },
};
use serde_json::Value;
use trellis_core::{
    auth::OptionalAuth,
    client::client_address,
    payload::{Matching, StringRule, TypedJsonBody},
    problem::RequestScope,
};

use crate::{
    app::{Ingest, Submission},
    domain::{ClientEvent, Origin, Utm, received_now},
    error::BiError,
    limit::Sender,
};

/// The most events one request may carry.
pub const MAX_BATCH: usize = 500;

/// An event name.
pub struct EventName;

impl StringRule for EventName {
    const PATTERN: &'static str = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$";
    const MAX_CHARS: usize = 64;
}

/// A UTM value: no control characters, at most 200 characters.
pub struct UtmText;

impl StringRule for UtmText {
    const PATTERN: &'static str = r"^[^\x00-\x1f\x7f-\x9f]*$";
    const MAX_CHARS: usize = 200;
}

// Read through `TypedJsonBody`: the serde form must refuse whatever the schema refuses
// (see the tests), which is why optional fields may be absent but not `null`.
/// One event from a client.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "BiEventInput")]
#[serde(deny_unknown_fields)]
pub struct EventInput {
    /// What happened: lower-case words of letters, digits and `_`, joined by `.`
    /// (`checkout.completed`), at most 64 characters.
    pub name: Matching<EventName>,
    /// When it happened, by the client's clock (RFC 3339; written out in UTC).
    #[serde(default, deserialize_with = "rfc3339")]
    pub timestamp: Option<time::OffsetDateTime>,
    /// Free-form properties: a JSON object, at most `modules.bi.max_properties_bytes`
    /// (16 KiB by default) as compact JSON.
    #[serde(default, deserialize_with = "present")]
    pub properties: Option<BTreeMap<String, Value>>,
    /// UTM attribution.
    #[serde(default, deserialize_with = "present_object")]
    pub utm: Option<UtmInput>,
}

/// UTM attribution of an event.
#[derive(Debug, Object, Deserialize)]
#[oai(rename = "BiUtm")]
#[serde(deny_unknown_fields)]
pub struct UtmInput {
    /// `utm_source`.
    #[serde(default, deserialize_with = "present")]
    pub source: Option<Matching<UtmText>>,
    /// `utm_medium`.
    #[serde(default, deserialize_with = "present")]
    pub medium: Option<Matching<UtmText>>,
    /// `utm_campaign`.
    #[serde(default, deserialize_with = "present")]
    pub campaign: Option<Matching<UtmText>>,
    /// `utm_term`.
    #[serde(default, deserialize_with = "present")]
    pub term: Option<Matching<UtmText>>,
    /// `utm_content`.
    #[serde(default, deserialize_with = "present")]
    pub content: Option<Matching<UtmText>>,
}

/// An optional field: absent is `None`; when present it must be a value, since the
/// schema allows no `null`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

/// An optional object field: when present it must be an object (see [`AsObject`]).
fn present_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    AsObject::deserialize(deserializer).map(|AsObject(value)| Some(value))
}

/// `T` read from a JSON object only: serde's derived structs also take an array of their
/// fields in order (`"utm": []`, `[["a"]]` as a batch), which the schema refuses.
struct AsObject<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for AsObject<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Only<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(Only(std::marker::PhantomData))
            .map(AsObject)
    }
}

/// An optional RFC 3339 date-time (no `null`), read as poem-openapi reads one.
fn rfc3339<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<time::OffsetDateTime>, D::Error> {
    let text = String::deserialize(deserializer)?;
    time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// One event, or a batch of up to 500 (accepted whole or not at all). Written by hand:
/// poem-openapi's derived `oneOf` parses a copy of the body with every alternative; this
/// picks the one the JSON type calls for.
#[derive(Debug)]
pub enum EventsRequest {
    /// One event.
    Single(EventInput),
    /// A batch.
    Batch(Vec<EventInput>),
}

const EVENTS_REQUEST: &str = "BiEventsRequest";

impl Type for EventsRequest {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        EVENTS_REQUEST.into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Reference(EVENTS_REQUEST.into())
    }

    fn register(registry: &mut Registry) {
        registry.create_schema::<Self, _>(EVENTS_REQUEST.into(), |registry| {
            <Vec<EventInput>>::register(registry);
            MetaSchema {
                description: Some(
                    "One event, or a batch of up to 500 (accepted whole or not at all).",
                ),
                one_of: vec![EventInput::schema_ref(), <Vec<EventInput>>::schema_ref()],
                ..MetaSchema::ANY
            }
        });
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromJSON for EventsRequest {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::Array(items) => <Vec<EventInput>>::parse_from_json(Some(Value::Array(items)))
                .map(Self::Batch)
                .map_err(ParseError::propagate),
            other => EventInput::parse_from_json(Some(other))
                .map(Self::Single)
                .map_err(ParseError::propagate),
        }
    }
}

impl<'de> Deserialize<'de> for EventsRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Shape;

        impl<'de> Visitor<'de> for Shape {
            type Value = EventsRequest;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event or an array of events")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                EventInput::deserialize(MapAccessDeserializer::new(map)).map(EventsRequest::Single)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<AsObject<EventInput>>::deserialize(SeqAccessDeserializer::new(seq))
                    .map(|events| EventsRequest::Batch(events.into_iter().map(|e| e.0).collect()))
            }
        }

        deserializer.deserialize_any(Shape)
    }
}

/// Events accepted for delivery.
#[derive(Debug, Object)]
#[oai(rename = "BiAccepted")]
pub struct Accepted {
    /// How many events were accepted.
    pub accepted: u32,
    /// Their ids, in request order; each message on the queue carries its id.
    pub ids: Vec<String>,
}

/// Success of the ingest operation.
#[derive(Debug, ApiResponse)]
pub enum IngestResponse {
    /// Every event was stored (on disk, unless the server runs with `mq.durability =
    /// memory`) and will be delivered to the message queue at least once.
    #[oai(status = 202)]
    Accepted(Json<Accepted>),
}

trellis_core::problem_responses! {
    /// Errors of the ingest operation.
    pub enum IngestFailure from BiError {
        /// The bearer token is invalid or its session ended (sending none is fine).
        401 => Unauthorized,
        /// An event breaks a rule (`errors` names the event's index and field); nothing
        /// of the request was accepted.
        422 => Invalid,
        /// The client sent more events than its limit allows (counted in events, per
        /// client address, or per user when authenticated); nothing of the request was
        /// accepted. Retry after `Retry-After` seconds.
        429 => TooManyRequests,
        /// An unexpected failure.
        500 => Internal,
        /// The events cannot be stored right now (the message queue's spool is full or
        /// the disk refused the write) or the server is shutting down; nothing was
        /// accepted. Retry after `Retry-After` seconds.
        503 => Unavailable,
        _ => Internal,
    }
}

impl From<EventInput> for ClientEvent {
    fn from(input: EventInput) -> Self {
        Self {
            name: input.name.into_inner(),
            timestamp: input.timestamp,
            properties: input.properties.unwrap_or_default(),
            utm: input.utm.map(|u| Utm {
                source: u.source.map(Matching::into_inner),
                medium: u.medium.map(Matching::into_inner),
                campaign: u.campaign.map(Matching::into_inner),
                term: u.term.map(Matching::into_inner),
                content: u.content.map(Matching::into_inner),
            }),
        }
    }
}

/// The bi module's API.
pub struct BiApi {
    ingest: Ingest,
}

impl BiApi {
    pub fn new(ingest: Ingest) -> Self {
        Self { ingest }
    }
}

#[OpenApi(prefix_path = "/api/v1/bi")]
impl BiApi {
    /// Record events
    ///
    /// Takes one event or a batch of up to 500. Each is given an id and the time it was
    /// received, with the request id and the caller (when a bearer token is sent), is
    /// stored before the answer, and is forwarded to the message queue asynchronously
    /// (at least once; a consumer may see an id twice). A batch is accepted whole or not at
    /// all. Each event counts against the sender's limit: its client address, or its user
    /// when a bearer token is sent (429 with `Retry-After` beyond it).
    #[oai(path = "/events", method = "post", operation_id = "recordBiEvents")]
    async fn record(
        &self,
        req: &Request,
        auth: OptionalAuth,
        body: TypedJsonBody<EventsRequest>,
    ) -> Result<IngestResponse, IngestFailure> {
        let sender = match &auth.0 {
            Some(principal) => Sender::User(principal.user_id.clone()),
            None => Sender::Address(
                client_address(req).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            ),
        };
        let (events, batch) = match body.0 {
            EventsRequest::Single(event) => (vec![event.into()], false),
            EventsRequest::Batch(events) => (events.into_iter().map(Into::into).collect(), true),
        };
        let submission = Submission {
            events,
            batch,
            sender,
        };
        let origin = Origin {
            request_id: RequestScope::current_id().map(|id| id.to_string()),
            traceparent: trellis_core::telemetry::traceparent(),
            user_id: auth.0.as_ref().map(|p| p.user_id.clone()),
            session_id: auth.0.map(|p| p.session_id),
            received_at: received_now(),
        };
        let ids = self.ingest.accept(submission, origin).await?;
        Ok(IngestResponse::Accepted(Json(Accepted {
            accepted: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            ids,
        })))
    }
}

#[cfg(test)]
mod tests {
    use trellis_core::payload::typed_accepts_only_schema_valid;

    use super::*;

    fn serde_accepts(body: &str) -> bool {
        serde_json::from_str::<EventsRequest>(body).is_ok()
    }

    #[test]
    fn valid_bodies_take_the_typed_path() {
        for body in [
            r#"{"name":"a"}"#,
            r#"{"name":"checkout.completed","timestamp":"2026-11-24T10:00:00+01:00","properties":{"a":1,"b":{"c":[1,null]}},"utm":{"source":"x","campaign":""}}"#,
            r#"{"name":"a","utm":{}}"#,
            r#"[{"name":"a"},{"name":"b.c_2","properties":{}}]"#,
            "[]",
        ] {
            assert!(serde_accepts(body), "{body}");
            assert!(
                typed_accepts_only_schema_valid::<EventsRequest>(body.as_bytes()),
                "{body}"
            );
        }
    }

    #[test]
    fn serde_refuses_bodies_the_schema_refuses() {
        let long_name = format!(r#"{{"name":"{}"}}"#, "a".repeat(65));
        let long_utm = format!(r#"{{"name":"a","utm":{{"term":"{}"}}}}"#, "x".repeat(201));
        let hostile = [
            "",
            "null",
            r#""event""#,
            "1",
            "true",
            "{}",
            "[1]",
            r#"[[{"name":"a"}]]"#,
            r#"{"name":null}"#,
            r#"{"name":5}"#,
            r#"{"name":"A"}"#,
            r#"{"name":"a b"}"#,
            r#"{"name":"a."}"#,
            &long_name,
            r#"{"name":"a","extra":1}"#,
            r#"{"name":"a","timestamp":null}"#,
            r#"{"name":"a","properties":null}"#,
            r#"{"name":"a","utm":null}"#,
            r#"{"name":"a","utm":{"source":null}}"#,
            r#"{"name":"a","name":"b"}"#,
            r#"{"name":"a","timestamp":"yesterday"}"#,
            r#"{"name":"a","timestamp":5}"#,
            r#"{"name":"a","properties":[1]}"#,
            r#"{"name":"a","properties":"p"}"#,
            r#"{"name":"a","utm":"s"}"#,
            r#"{"name":"a","utm":{"x":"y"}}"#,
            r#"{"name":"a","utm":{"source":"\u0001"}}"#,
            r#"{"name":"a","utm":{"source":"\u007f"}}"#,
            r#"{"name":"a","utm":{"source":7}}"#,
            &long_utm,
            r#"[{"name":"a"},{"name":"B"}]"#,
            r#"{"name":"a","properties":{"n":1e999}}"#,
            r#"{"name":"a","utm":[]}"#,
            r#"{"name":"a","utm":["s"]}"#,
            r#"[["a"]]"#,
        ];
        for body in hostile {
            assert!(!serde_accepts(body), "serde must refuse {body}");
        }
    }

    // The typed path is sound when whatever serde accepts, the schema accepts too:
    // checked over generated bodies, most of them event-shaped and many of them valid.
    mod generated {
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        use super::*;

        fn text() -> BoxedStrategy<String> {
            prop_oneof![
                "[a-z][a-z0-9_]{0,8}(\\.[a-z][a-z0-9_]{0,5}){0,2}",
                "[A-Za-z0-9_. -]{0,12}",
                "\\PC{0,8}",
                "[\\x00-\\x1f\\x7f-\\x9f]{1,3}",
                "2026-0[1-9]-[0-2][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9](Z|\\+01:00|)",
                Just("a".repeat(64)),
                Just("a".repeat(65)),
                Just("x".repeat(200)),
                Just("x".repeat(201)),
            ]
            .boxed()
        }

        fn json() -> BoxedStrategy<Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("JSON numbers are finite", |f| f.is_finite())
                    .prop_map(Value::from),
                text().prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
                ]
            })
            .boxed()
        }

        fn name() -> BoxedStrategy<String> {
            "[a-z][a-z0-9_]{0,8}(\\.[a-z][a-z0-9_]{0,5}){0,2}".boxed()
        }

        fn object(fields: Vec<(&'static str, Option<Value>)>) -> Value {
            Value::Object(
                fields
                    .into_iter()
                    .filter_map(|(key, value)| Some((key.to_owned(), value?)))
                    .collect(),
            )
        }

        /// UTM fields (and a stray one), each with text or any JSON.
        fn utm() -> BoxedStrategy<Value> {
            let field = || {
                prop::option::weighted(
                    0.4,
                    prop_oneof![3 => text().prop_map(Value::from), 1 => json()],
                )
            };
            (
                field(),
                field(),
                field(),
                field(),
                field(),
                prop::option::weighted(0.05, json()),
            )
                .prop_map(|(source, medium, campaign, term, content, stray)| {
                    object(vec![
                        ("source", source),
                        ("medium", medium),
                        ("campaign", campaign),
                        ("term", term),
                        ("content", content),
                        ("stray", stray),
                    ])
                })
                .boxed()
        }

        /// An event: each field absent or present, mostly well-formed, sometimes any JSON.
        fn event() -> BoxedStrategy<Value> {
            (
                prop::option::weighted(0.9, prop_oneof![4 => name().prop_map(Value::from), 1 => text().prop_map(Value::from), 1 => json()]),
                prop::option::weighted(0.5, prop_oneof![3 => text().prop_map(Value::from), 1 => json()]),
                prop::option::weighted(
                    0.5,
                    prop_oneof![
                        3 => prop::collection::btree_map("[a-z]{1,4}", json(), 0..4)
                            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
                        1 => json(),
                    ],
                ),
                prop::option::weighted(0.5, prop_oneof![3 => utm(), 1 => json()]),
                prop::option::weighted(0.05, json()),
            )
                .prop_map(|(name, timestamp, properties, utm, extra)| {
                    object(vec![
                        ("name", name),
                        ("timestamp", timestamp),
                        ("properties", properties),
                        ("utm", utm),
                        ("extra", extra),
                    ])
                })
                .boxed()
        }

        fn body() -> BoxedStrategy<Value> {
            prop_oneof![
                4 => event(),
                2 => prop::collection::vec(event(), 0..4).prop_map(Value::from),
                1 => json(),
            ]
            .boxed()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn whatever_serde_accepts_the_schema_accepts(body in body()) {
                let text = body.to_string();
                prop_assert!(
                    typed_accepts_only_schema_valid::<EventsRequest>(text.as_bytes()),
                    "serde accepted what the schema refuses: {text}"
                );
            }
        }
    }
}
