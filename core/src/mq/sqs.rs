//! Amazon SQS (or a compatible server) through aws-sdk-sqs: `SendMessageBatch` with up to
//! 10 entries and 1 MiB. The SDK's own retries are off: the queue in front resends
//! failed batches and refused entries itself, so every retry is counted. On a FIFO queue
//! (`….fifo`) each message's id is its deduplication id. A message's `traceparent`
//! travels as the string message attribute `traceparent`.

use std::time::Duration;

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_sqs::{
    Client,
    config::SharedHttpClient,
    error::DisplayErrorContext,
    types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry},
};
use aws_smithy_http_client::{
    Builder,
    tls::{Provider, rustls_provider::CryptoMode},
};
use futures_util::future::BoxFuture;

use super::{BatchLimits, EntryFailure, OutboundMessage, TRACEPARENT, Transport};
use crate::config::SqsConfig;

/// The HTTP client every SQS connection uses: hyper with rustls and ring, the platform's
/// root certificates (plain `http://` endpoints, such as a local test server, work too).
pub fn https_client() -> SharedHttpClient {
    Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// An SQS queue.
#[derive(Debug)]
pub struct SqsTransport {
    client: Client,
    queue_url: String,
    fifo: bool,
}

impl SqsTransport {
    /// Builds the client: region and endpoint from `config` (or the environment),
    /// credentials from the usual AWS sources. Nothing is sent yet.
    pub async fn connect(config: &SqsConfig) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https_client())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(timeout)
                    .operation_attempt_timeout(timeout)
                    .build(),
            );
        if !config.region.is_empty() {
            loader = loader.region(Region::new(config.region.clone()));
        }
        if !config.endpoint_url.is_empty() {
            loader = loader.endpoint_url(&config.endpoint_url);
        }
        let shared = loader.load().await;
        if shared.region().is_none() {
            anyhow::bail!("`mq.sqs.region`: no region configured (set it, or AWS_REGION)");
        }
        Ok(Self {
            client: Client::new(&shared),
            queue_url: config.queue_url.clone(),
            fifo: config.queue_url.ends_with(".fifo"),
        })
    }

    fn entry(
        &self,
        index: usize,
        message: &OutboundMessage,
    ) -> Result<SendMessageBatchRequestEntry, String> {
        let mut entry = SendMessageBatchRequestEntry::builder()
            .id(index.to_string())
            .message_body(sqs_safe(&message.body));
        if self.fifo {
            entry = entry
                .message_group_id("trellis")
                .message_deduplication_id(&message.id);
        }
        if let Some(traceparent) = &message.traceparent {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(traceparent)
                .build()
                .map_err(|e| e.to_string())?;
            entry = entry.message_attributes(TRACEPARENT, value);
        }
        entry.build().map_err(|e| e.to_string())
    }
}

/// SQS accepts only some characters (XML 1.0's); JSON from serde carries U+FFFE and
/// U+FFFF raw, so they are written as JSON escapes, which keeps the document equal.
fn sqs_safe(body: &str) -> String {
    if !body.contains(['\u{fffe}', '\u{ffff}']) {
        return body.to_owned();
    }
    body.replace('\u{fffe}', "\\ufffe")
        .replace('\u{ffff}', "\\uffff")
}

impl Transport for SqsTransport {
    fn backend(&self) -> &'static str {
        "sqs"
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_messages: 10,
            max_bytes: 1024 * 1024,
            max_in_flight: 64,
        }
    }

    fn send<'a>(
        &'a self,
        batch: &'a [OutboundMessage],
    ) -> BoxFuture<'a, Result<Vec<EntryFailure>, String>> {
        Box::pin(async move {
            let entries = batch
                .iter()
                .enumerate()
                .map(|(i, m)| self.entry(i, m))
                .collect::<Result<Vec<_>, _>>()?;
            let output = self
                .client
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| DisplayErrorContext(e).to_string())?;
            let mut answered = vec![false; batch.len()];
            for ok in output.successful() {
                if let Some(seen) = ok
                    .id()
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| answered.get_mut(i))
                {
                    *seen = true;
                }
            }
            let mut failures = Vec::new();
            for failed in output.failed() {
                let Some(index) = failed
                    .id()
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i < batch.len())
                else {
                    continue;
                };
                answered[index] = true;
                failures.push(EntryFailure {
                    index,
                    retryable: !failed.sender_fault(),
                    reason: format!("{}: {}", failed.code(), failed.message().unwrap_or("")),
                });
            }
            // An entry the answer does not mention was not accepted.
            failures.extend(
                answered
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| !**a)
                    .map(|(index, _)| EntryFailure {
                        index,
                        retryable: true,
                        reason: "not mentioned in the answer".into(),
                    }),
            );
            Ok(failures)
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.client
                .get_queue_attributes()
                .queue_url(&self.queue_url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| DisplayErrorContext(e).to_string())
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_sqs_refuses_become_json_escapes() {
        let body = serde_json::json!({ "k": "a\u{ffff}b\u{fffe}" }).to_string();
        let safe = sqs_safe(&body);
        assert!(!safe.contains('\u{ffff}'));
        let back: serde_json::Value = serde_json::from_str(&safe).expect("still JSON");
        assert_eq!(back["k"], "a\u{ffff}b\u{fffe}");
        assert_eq!(sqs_safe("{\"plain\":1}"), "{\"plain\":1}");
    }
}
