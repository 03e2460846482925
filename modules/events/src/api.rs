//! The HTTP surface: the registry's publications, listed and resubmitted.

use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use trellis_core::{
    auth::BearerAuth,
    clock::{Timestamp, timestamp},
    events::{Publication, PublicationStatus},
};

use crate::app::Publications;

/// Where a publication stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for its handler, or for another attempt.
    Pending,
    /// Its handler ran.
    Completed,
    /// Its handler failed every attempt (`events.max_attempts`); kept until resubmitted.
    Failed,
}

impl From<Status> for PublicationStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Pending => Self::Pending,
            Status::Completed => Self::Completed,
            Status::Failed => Self::Failed,
        }
    }
}

impl From<PublicationStatus> for Status {
    fn from(status: PublicationStatus) -> Self {
        match status {
            PublicationStatus::Pending => Self::Pending,
            PublicationStatus::Completed => Self::Completed,
            PublicationStatus::Failed => Self::Failed,
        }
    }
}

/// One event, as delivered to one module's handler.
#[derive(Debug, Object)]
pub struct PublicationView {
    /// The publication's id.
    pub id: String,
    /// The event's id, the same in each of the event's publications.
    pub event_id: String,
    /// The event's name (`user.registered`).
    pub event: String,
    /// The module whose handler it is for.
    pub module: String,
    /// Where it stands.
    pub status: Status,
    /// Attempts made (since the last resubmission).
    pub attempts: u32,
    /// When the event was emitted.
    pub created_at: Timestamp,
    /// When its handler completed.
    #[oai(skip_serializing_if_is_none)]
    pub completed_at: Option<Timestamp>,
    /// The last failed attempt's error.
    #[oai(skip_serializing_if_is_none)]
    pub last_error: Option<String>,
    /// The event as stored.
    pub payload: serde_json::Value,
}

impl From<Publication> for PublicationView {
    fn from(p: Publication) -> Self {
        Self {
            payload: serde_json::from_str(&p.payload)
                .unwrap_or(serde_json::Value::String(p.payload)),
            id: p.id,
            event_id: p.event_id,
            event: p.event,
            module: p.module,
            status: p.status.into(),
            attempts: u32::try_from(p.attempts).unwrap_or(u32::MAX),
            created_at: timestamp(p.created_at_ms),
            completed_at: p.completed_at_ms.map(timestamp),
            last_error: p.last_error,
        }
    }
}

/// One page of publications, oldest first.
#[derive(Debug, Object)]
pub struct PublicationPage {
    /// The publications.
    pub publications: Vec<PublicationView>,
    /// Pass as `cursor` to get the next page; absent on the last one.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

/// How many failed publications run again.
#[derive(Debug, Object)]
pub struct ResubmittedCount {
    /// Publications made pending again.
    pub resubmitted: u64,
}

#[derive(ApiResponse)]
enum PageResponse {
    /// A page of publications.
    #[oai(status = 200)]
    Ok(Json<PublicationPage>),
}

#[derive(ApiResponse)]
enum ResubmitResponse {
    /// The publication is pending again; the relay runs its handler shortly.
    #[oai(status = 204)]
    Resubmitted,
}

#[derive(ApiResponse)]
enum ResubmitAllResponse {
    /// The failed publications are pending again.
    #[oai(status = 200)]
    Ok(Json<ResubmittedCount>),
}

trellis_core::problem_responses! {
    /// Errors of the publication operations.
    pub enum PublicationFailure from crate::error::EventsError {
        /// Missing, invalid or expired token, or ended session.
        401 => Unauthorized,
        /// The caller lacks the `events:manage` permission.
        403 => Forbidden,
        /// No publication has the id.
        404 => NotFound,
        /// The publication is not failed.
        409 => Conflict,
        /// An unexpected failure.
        500 => Internal,
        /// The database is unavailable; retry after `Retry-After`.
        503 => Unavailable,
        _ => Internal,
    }
}

/// The `events` module's API.
pub struct EventsApi {
    publications: Publications,
}

impl EventsApi {
    /// The API over the service.
    pub fn new(publications: Publications) -> Self {
        Self { publications }
    }
}

#[OpenApi(prefix_path = "/api/v1/events")]
impl EventsApi {
    /// List event publications
    ///
    /// Publications in emission order, a page at a time, optionally only those with a
    /// status (`failed`: their handler gave up). Needs the `events:manage` permission.
    #[oai(
        path = "/publications",
        method = "get",
        operation_id = "listEventPublications"
    )]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Only publications with this status.
        status: Query<Option<Status>>,
        /// The `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// Page size, 1 to 100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
    ) -> Result<PageResponse, PublicationFailure> {
        let page = self
            .publications
            .list(
                &auth.0,
                status.0.map(Into::into),
                cursor.0.as_deref(),
                limit.0,
            )
            .await?;
        Ok(PageResponse::Ok(Json(PublicationPage {
            publications: page.publications.into_iter().map(Into::into).collect(),
            next_cursor: page.next_cursor,
        })))
    }

    /// Resubmit a failed publication
    ///
    /// The relay runs the publication's handler again, with its attempts counted afresh.
    /// Needs the `events:manage` permission.
    #[oai(
        path = "/publications/:id/resubmit",
        method = "post",
        operation_id = "resubmitEventPublication"
    )]
    async fn resubmit(
        &self,
        auth: BearerAuth,
        /// The publication's id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
    ) -> Result<ResubmitResponse, PublicationFailure> {
        self.publications.resubmit(&auth.0, &id.0).await?;
        Ok(ResubmitResponse::Resubmitted)
    }

    /// Resubmit every failed publication
    ///
    /// Needs the `events:manage` permission.
    #[oai(
        path = "/publications/resubmit-failed",
        method = "post",
        operation_id = "resubmitFailedEventPublications"
    )]
    async fn resubmit_failed(
        &self,
        auth: BearerAuth,
    ) -> Result<ResubmitAllResponse, PublicationFailure> {
        let resubmitted = self.publications.resubmit_failed(&auth.0).await?;
        Ok(ResubmitAllResponse::Ok(Json(ResubmittedCount {
            resubmitted,
        })))
    }
}
