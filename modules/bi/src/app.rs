//! The rules: check a request's events (all or nothing), enrich them, and store them for
//! the message queue; turn domain events into BI events.

use std::sync::Arc;

use trellis_core::{ModuleContext, problem::FieldViolation};

use crate::{
    BiConfig,
    domain::{
        BiEvent, ClientEvent, Internal, Origin, Source, json_size, received_now, utc_rfc3339,
    },
    error::BiError,
    limit::{IngestLimits, Limited, Sender},
    repo::Forwarder,
};

/// Accepts BI events: the module's service.
#[derive(Debug, Clone)]
pub struct Ingest {
    forwarder: Forwarder,
    config: Arc<BiConfig>,
    /// The senders' buckets, for client events.
    limits: IngestLimits,
}

/// Events as one request carried them: one event, or a batch (then field pointers start
/// with the event's index).
#[derive(Debug)]
pub struct Submission {
    pub events: Vec<ClientEvent>,
    pub batch: bool,
    /// Whose bucket the events are taken from.
    pub sender: Sender,
}

impl Ingest {
    pub fn from_context(ctx: &ModuleContext) -> anyhow::Result<Self> {
        let config = ctx.config::<BiConfig>()?;
        Ok(Self {
            forwarder: Forwarder::new(ctx.queue().clone()),
            limits: IngestLimits::new(&config, ctx.cache())?,
            config: Arc::new(config),
        })
    }

    /// Checks every event and the sender's limit, then queues them all or none. Answers
    /// the ids, in order.
    pub async fn accept(
        &self,
        submission: Submission,
        origin: Origin,
    ) -> Result<Vec<String>, BiError> {
        self.check(&submission).map_err(BiError::Invalid)?;
        self.limits
            .take(&submission.sender, submission.events.len())
            .await
            .map_err(|Limited { retry_after_secs }| BiError::RateLimited { retry_after_secs })?;
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
        self.forwarder.forward(&events).await?;
        Ok(ids)
    }

    /// Every rule, for every event.
    fn check(&self, submission: &Submission) -> Result<(), Vec<FieldViolation>> {
        let count = submission.events.len();
        if count > self.config.max_batch {
            return Err(vec![FieldViolation::new(
                "body",
                "",
                format!(
                    "has {count} events; at most {} are accepted per request",
                    self.config.max_batch
                ),
            )]);
        }
        let mut violations = Vec::new();
        for (index, event) in submission.events.iter().enumerate() {
            let field = |name: &str| match submission.batch {
                true => format!("/{index}/{name}"),
                false => format!("/{name}"),
            };
            let size = json_size(&event.properties);
            if size > self.config.max_properties_bytes {
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
        match violations.is_empty() {
            true => Ok(()),
            false => Err(violations),
        }
    }

    /// Records a domain event as a BI event. A full queue cannot be answered to anyone
    /// here, so it is logged.
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
        if let Err(error) = self.forwarder.forward(std::slice::from_ref(&event)).await {
            tracing::error!(event = M::NAME, id, %error, "internal BI event not recorded");
        }
    }
}
