//! The bi module's outbound side: one message-queue message per BI event.

use trellis_core::mq::{MessageQueue, OutboundMessage};

use crate::domain::BiEvent;

/// Forwards BI events to the message queue.
#[derive(Debug, Clone)]
pub struct Forwarder {
    queue: MessageQueue,
}

impl Forwarder {
    pub fn new(queue: MessageQueue) -> Self {
        Self { queue }
    }

    /// Buffers the event's JSON for delivery (waits while the queue's buffer is full).
    pub async fn forward(&self, event: &BiEvent) -> anyhow::Result<()> {
        let body = serde_json::to_string(event)?;
        self.queue
            .publish(OutboundMessage {
                id: event.id.clone(),
                body,
            })
            .await?;
        Ok(())
    }
}
