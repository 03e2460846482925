//! The rules: check a request's events (all or nothing), enrich them, and hand them to
//! the event dispatcher; turn domain events into BI events.

use std::sync::Arc;

use trellis_core::{ModuleContext, events::EventDispatcher, problem::FieldViolation};

use crate::{
    BiConfig,
    domain::{
        BiEvent, ClientEvent, Internal, Origin, Source, oversized, received_now, utc_rfc3339,
    },
    error::BiError,
};

/// Accepts BI events.
#[derive(Debug, Clone)]
pub struct Ingest {
    events: EventDispatcher,
    config: Arc<BiConfig>,
}

/// Events as one request carried them: one event, or a batch (then field pointers start
/// with the event's index).
#[derive(Debug)]
pub struct Submission {
    pub events: Vec<ClientEvent>,
    pub batch: bool,
}

impl Ingest {
    pub fn from_context(ctx: &ModuleContext<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            events: ctx.events().clone(),
            config: Arc::new(ctx.config::<BiConfig>()?),
        })
    }

    /// Checks every event, then queues them all or none. Answers the ids, in order.
    pub async fn accept(
        &self,
        submission: Submission,
        origin: Origin,
    ) -> Result<Vec<String>, BiError> {
        let violations = self.check(&submission);
        if !violations.is_empty() {
            return Err(BiError::Invalid(violations));
        }
        let events: Vec<BiEvent> = submission
            .events
            .into_iter()
            .map(|e| {
                BiEvent::enrich(
                    e.name,
                    Source::Client,
                    e.timestamp.map(utc_rfc3339),
                    e.properties,
                    e.utm,
                    origin.clone(),
                )
            })
            .collect();
        let ids = events.iter().map(|e| e.id.clone()).collect();
        self.events.emit_all(events).await?;
        Ok(ids)
    }

    fn check(&self, submission: &Submission) -> Vec<FieldViolation> {
        let mut violations = Vec::new();
        let count = submission.events.len();
        if count > self.config.max_batch {
            violations.push(FieldViolation::new(
                "body",
                "",
                format!(
                    "has {count} events; at most {} are accepted per request",
                    self.config.max_batch
                ),
            ));
            return violations;
        }
        for (index, event) in submission.events.iter().enumerate() {
            let field = |name: &str| match submission.batch {
                true => format!("/{index}/{name}"),
                false => format!("/{name}"),
            };
            if let Some(size) = oversized(&event.properties, self.config.max_properties_bytes) {
                violations.push(FieldViolation::new(
                    "body",
                    field("properties"),
                    format!(
                        "is {size} bytes as JSON; at most {} are accepted",
                        self.config.max_properties_bytes
                    ),
                ));
            }
        }
        violations
    }

    /// Records a domain event as a BI event. A full queue cannot be answered to anyone
    /// here, so it is logged (and counted by the dispatcher as rejected).
    pub async fn record_internal<M: Internal>(&self, message: &M) {
        if !self.config.internal_events {
            return;
        }
        let origin = Origin {
            request_id: trellis_core::problem::RequestScope::current_id().map(|id| id.to_string()),
            user_id: message.user_id().map(str::to_owned),
            session_id: None,
            received_at: received_now(),
        };
        let event = BiEvent::enrich(
            M::NAME.to_owned(),
            Source::Server,
            None,
            message.properties(),
            None,
            origin,
        );
        let id = event.id.clone();
        if let Err(error) = self.events.emit(event).await {
            tracing::error!(event = M::NAME, id, %error, "internal BI event not recorded");
        }
    }
}
