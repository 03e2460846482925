//! HTTP surface of the bi module: `POST /api/v1/bi/events`.

use std::{borrow::Cow, collections::BTreeMap};

use poem_openapi::{
    ApiResponse, Object, OpenApi,
    payload::Json,
    registry::{MetaSchema, MetaSchemaRef, Registry},
    types::{ParseError, ParseFromJSON, ParseResult, Type},
};
use serde_json::Value;
use trellis_core::{
    auth::OptionalAuth,
    payload::{JsonBody, Matching, StringRule},
    problem::RequestScope,
};

use crate::{
    app::{Ingest, Submission},
    domain::{ClientEvent, Origin, Utm},
    error::BiError,
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

/// One event from a client.
#[derive(Debug, Object)]
#[oai(rename = "BiEventInput")]
pub struct EventInput {
    /// What happened: lower-case words of letters, digits and `_`, joined by `.`
    /// (`checkout.completed`), at most 64 characters.
    pub name: Matching<EventName>,
    /// When it happened, by the client's clock (RFC 3339; written out in UTC).
    pub timestamp: Option<time::OffsetDateTime>,
    /// Free-form properties: a JSON object, at most `modules.bi.max_properties_bytes`
    /// (16 KiB by default) as compact JSON.
    pub properties: Option<BTreeMap<String, Value>>,
    /// UTM attribution.
    pub utm: Option<UtmInput>,
}

/// UTM attribution of an event.
#[derive(Debug, Object)]
#[oai(rename = "BiUtm")]
pub struct UtmInput {
    /// `utm_source`.
    pub source: Option<Matching<UtmText>>,
    /// `utm_medium`.
    pub medium: Option<Matching<UtmText>>,
    /// `utm_campaign`.
    pub campaign: Option<Matching<UtmText>>,
    /// `utm_term`.
    pub term: Option<Matching<UtmText>>,
    /// `utm_content`.
    pub content: Option<Matching<UtmText>>,
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
    /// Every event was accepted and will be forwarded to the message queue.
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
        /// An unexpected failure.
        500 => Internal,
        /// The event queue is full or the server is shutting down; nothing was accepted.
        /// Retry after `Retry-After` seconds.
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
    /// received, with the request id and the caller (when a bearer token is sent), and is
    /// forwarded to the message queue asynchronously. A batch is accepted whole or not at
    /// all.
    #[oai(path = "/events", method = "post", operation_id = "recordBiEvents")]
    async fn record(
        &self,
        auth: OptionalAuth,
        body: JsonBody<EventsRequest>,
    ) -> Result<IngestResponse, IngestFailure> {
        let submission = match body.0 {
            EventsRequest::Single(event) => Submission {
                events: vec![event.into()],
                batch: false,
            },
            EventsRequest::Batch(events) => Submission {
                events: events.into_iter().map(Into::into).collect(),
                batch: true,
            },
        };
        let origin = Origin {
            request_id: RequestScope::current_id().map(|id| id.to_string()),
            user_id: auth.0.as_ref().map(|p| p.user_id.clone()),
            session_id: auth.0.map(|p| p.session_id),
        };
        let ids = self.ingest.accept(submission, origin).await?;
        Ok(IngestResponse::Accepted(Json(Accepted {
            accepted: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            ids,
        })))
    }
}
