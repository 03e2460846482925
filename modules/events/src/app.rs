//! The rules: who may look, and paging over core's registry.

use std::sync::Arc;

use trellis_core::{
    ModuleContext,
    auth::Principal,
    events::{Publication, PublicationStatus, Registry, Resubmitted},
};

use crate::{EventsModuleConfig, error::EventsError};

/// The permission to list and resubmit publications.
pub const MANAGE_EVENTS: &str = "events:manage";

/// A page of publications.
#[derive(Debug)]
pub struct Page {
    pub publications: Vec<Publication>,
    /// The id to continue after; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The module's service.
#[derive(Debug, Clone)]
pub struct Publications {
    registry: Registry,
    config: Arc<EventsModuleConfig>,
}

impl Publications {
    pub fn from_context(ctx: &ModuleContext) -> anyhow::Result<Self> {
        Ok(Self {
            registry: ctx.event_registry(),
            config: Arc::new(ctx.config()?),
        })
    }

    fn allow(principal: &Principal) -> Result<(), EventsError> {
        if principal.can(MANAGE_EVENTS) {
            Ok(())
        } else {
            Err(EventsError::Forbidden)
        }
    }

    /// Publications after `cursor`, `limit` at most (default 20, at most `page_max`).
    pub async fn list(
        &self,
        principal: &Principal,
        status: Option<PublicationStatus>,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Page, EventsError> {
        Self::allow(principal)?;
        let limit = limit.unwrap_or(20).clamp(1, self.config.page_max.max(1));
        let mut publications = self.registry.list(status, cursor, limit + 1).await?;
        let next_cursor = if publications.len() > limit as usize {
            publications.truncate(limit as usize);
            publications.last().map(|p| p.id.clone())
        } else {
            None
        };
        Ok(Page {
            publications,
            next_cursor,
        })
    }

    /// Runs the failed publication `id` again.
    pub async fn resubmit(&self, principal: &Principal, id: &str) -> Result<(), EventsError> {
        Self::allow(principal)?;
        match self.registry.resubmit(id).await? {
            Resubmitted::Yes => {
                tracing::info!(publication = id, actor = %principal.user_id, "publication resubmitted");
                Ok(())
            }
            Resubmitted::NotFound => Err(EventsError::NotFound),
            Resubmitted::NotFailed(status) => Err(EventsError::NotFailed(status.as_str())),
        }
    }

    /// Runs every failed publication again; how many.
    pub async fn resubmit_failed(&self, principal: &Principal) -> Result<u64, EventsError> {
        Self::allow(principal)?;
        let count = self.registry.resubmit_failed().await?;
        tracing::info!(count, actor = %principal.user_id, "failed publications resubmitted");
        Ok(count)
    }
}
