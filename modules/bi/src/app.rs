//! The rules: check a request's events (all or nothing), enrich them, and store them for
//! the message queue; turn domain events into BI events.

use std::sync::Arc;

use trellis_core::{ModuleContext, events::Published, problem::FieldViolation};

use crate::{
    BiConfig,
    domain::{
        BiEvent, ClientEvent, Internal, Origin, Source, json_size, rfc3339_millis, utc_rfc3339,
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
    /// Turns a domain event into a BI event (unless `internal_events` is off). The BI
    /// event takes the domain event's id and time, so a second delivery of it yields the
    /// same message; an error (the queue refused it) has the relay try again.
    pub async fn record_internal<M: Internal>(
        &self,
        published: &Published<M>,
    ) -> anyhow::Result<()> {
        if !self.config.internal_events {
            return Ok(());
        }
        let origin = Origin {
            request_id: published.request_id().map(str::to_owned),
            traceparent: trellis_core::telemetry::traceparent(),
            user_id: published.user_id().map(str::to_owned),
            session_id: None,
            received_at: rfc3339_millis(published.emitted_at_ms()),
        };
        let mut event = BiEvent::enrich(
            M::NAME.to_owned(),
            Source::Server,
            None,
            published.properties(),
            None,
            origin,
        );
        event.id = published.id().to_owned();
        self.forwarder
            .forward(std::slice::from_ref(&event))
            .await
            .map_err(|error| {
                anyhow::anyhow!("`{}` not stored for the message queue: {error}", M::NAME)
            })
    }
}
