//! The bi module's outbound side: one message-queue message per BI event.

use trellis_core::mq::{MessageQueue, OutboundMessage, PublishError};

use crate::domain::BiEvent;

/// Hands BI events to the message queue.
#[derive(Debug, Clone)]
pub struct Forwarder {
    queue: MessageQueue,
}

impl Forwarder {
    pub fn new(queue: MessageQueue) -> Self {
        Self { queue }
    }

    /// Stores the events' JSON for delivery, all or none (on disk before this returns,
    /// unless `mq.durability` is `memory`).
    pub async fn forward(&self, events: &[BiEvent]) -> Result<(), PublishError> {
        let messages = events
            .iter()
            .map(|event| OutboundMessage {
                id: event.id.clone(),
                body: serde_json::to_string(event).expect("a BI event serializes"),
                traceparent: event.traceparent.clone(),
            })
            .collect();
        self.queue.publish_all(messages).await
    }
}
