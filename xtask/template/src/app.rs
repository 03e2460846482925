//! The module's rules. No HTTP types and no SQL here.

use trellis_core::{ModuleContext, clock::Clock};

use crate::{
    {{Name}}Config,
    domain::{Item, NewItem, Page},
    error::{{Name}}Error,
    repo::ItemRepo,
};

/// A page's size when the client names none.
pub const DEFAULT_PAGE: u32 = 20;

/// The item service, built once and shared by everything the module declares.
#[derive(Clone)]
pub struct Items {
    repo: ItemRepo,
    clock: Clock,
    page_max: u32,
}

impl Items {
    /// The service over the module's context.
    pub fn from_context(ctx: &ModuleContext) -> anyhow::Result<Self> {
        let config: {{Name}}Config = ctx.config()?;
        anyhow::ensure!(
            config.page_max >= 1,
            "`modules.{{name}}.page_max`: must be at least 1"
        );
        Ok(Self {
            repo: ItemRepo::new(ctx.database()),
            clock: ctx.clock().clone(),
            page_max: config.page_max,
        })
    }

    /// Stores a new item, stamped with the module's clock.
    pub async fn create(&self, new: NewItem) -> Result<Item, {{Name}}Error> {
        let item = Item {
            id: uuid::Uuid::now_v7().to_string(),
            title: new.title.as_str().to_owned(),
            created_at: self.clock.now_millis(),
        };
        self.repo.insert(&item.id, &new.title, item.created_at).await?;
        Ok(item)
    }

    /// The item with `id`.
    pub async fn get(&self, id: &str) -> Result<Item, {{Name}}Error> {
        self.repo.get(id).await?.ok_or({{Name}}Error::NotFound)
    }

    /// A page of items after `cursor`, `limit` long at most (capped by `page_max`).
    pub async fn list(
        &self,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Page, {{Name}}Error> {
        let limit = limit.unwrap_or(DEFAULT_PAGE).clamp(1, self.page_max);
        // One more than asked says whether another page follows.
        let mut items = self
            .repo
            .list_after(cursor.unwrap_or_default(), limit + 1)
            .await?;
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next_cursor = more.then(|| items.last().map(|i| i.id.clone())).flatten();
        Ok(Page { items, next_cursor })
    }
}
