//! The HTTP surface: requests parsed into domain values, the service called, results and
//! errors mapped to responses and problems.

use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Path, Query},
    payload::Json,
};
use trellis_core::{
    clock::{Timestamp, timestamp},
    payload::JsonBody,
    problem::Violations,
};

use crate::{
    app::Items,
    domain::{Item, NewItem, Title},
    error::{{Name}}Error,
};

/// A new item.
#[derive(Debug, Object)]
pub struct NewItemRequest {
    /// 1 to 200 characters, not only spaces, no control characters.
    #[oai(validator(min_length = 1, max_length = 200))]
    pub title: String,
}

/// An item.
#[derive(Debug, Object)]
pub struct ItemView {
    /// The item's id.
    pub id: String,
    /// Its title.
    pub title: String,
    /// When it was created.
    pub created_at: Timestamp,
}

/// One page of items, oldest first.
#[derive(Debug, Object)]
pub struct ItemPage {
    /// The items.
    pub items: Vec<ItemView>,
    /// Pass as `cursor` to get the next page; absent on the last one.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

impl From<Item> for ItemView {
    fn from(item: Item) -> Self {
        Self {
            id: item.id,
            title: item.title,
            created_at: timestamp(item.created_at),
        }
    }
}

impl TryFrom<NewItemRequest> for NewItem {
    type Error = {{Name}}Error;

    fn try_from(request: NewItemRequest) -> Result<Self, {{Name}}Error> {
        let mut v = Violations::default();
        match v.check("title", Title::parse(&request.title)) {
            Some(title) => Ok(Self { title }),
            None => Err({{Name}}Error::Invalid(v.0)),
        }
    }
}

#[derive(ApiResponse)]
enum CreatedResponse {
    /// Created; `Location` names the new item.
    #[oai(status = 201)]
    Created(Json<ItemView>, #[oai(header = "Location")] String),
}

#[derive(ApiResponse)]
enum ItemResponse {
    /// The item.
    #[oai(status = 200)]
    Ok(Json<ItemView>),
}

#[derive(ApiResponse)]
enum PageResponse {
    /// A page of items.
    #[oai(status = 200)]
    Ok(Json<ItemPage>),
}

trellis_core::problem_responses! {
    /// Errors of the item operations.
    pub enum ItemFailure from {{Name}}Error {
        /// No item has the id.
        404 => NotFound,
        /// A field breaks a rule; `errors` names each.
        422 => Invalid,
        /// An unexpected failure.
        500 => Internal,
        /// The database is unavailable; retry after `Retry-After`.
        503 => Unavailable,
        _ => Internal,
    }
}

/// The `{{name}}` module's API.
pub struct ItemsApi {
    items: Items,
}

impl ItemsApi {
    /// The API over the service.
    pub fn new(items: Items) -> Self {
        Self { items }
    }
}

#[OpenApi(prefix_path = "/api/v1/{{name}}")]
impl ItemsApi {
    /// Create an item
    ///
    /// Stores an item; its title is trimmed.
    #[oai(path = "/items", method = "post", operation_id = "create{{Name}}Item")]
    async fn create(
        &self,
        body: JsonBody<NewItemRequest>,
    ) -> Result<CreatedResponse, ItemFailure> {
        let new = NewItem::try_from(body.0)?;
        let item = self.items.create(new).await?;
        let location = format!("/api/v1/{{name}}/items/{}", item.id);
        Ok(CreatedResponse::Created(Json(item.into()), location))
    }

    /// Get an item
    #[oai(path = "/items/:id", method = "get", operation_id = "get{{Name}}Item")]
    async fn get(
        &self,
        /// The item's id.
        #[oai(validator(max_length = 64))]
        id: Path<String>,
    ) -> Result<ItemResponse, ItemFailure> {
        let item = self.items.get(&id.0).await?;
        Ok(ItemResponse::Ok(Json(item.into())))
    }

    /// List items
    ///
    /// Items oldest first, a page at a time.
    #[oai(path = "/items", method = "get", operation_id = "list{{Name}}Items")]
    async fn list(
        &self,
        /// The `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// Page size, 1 to 100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
    ) -> Result<PageResponse, ItemFailure> {
        let page = self.items.list(cursor.0.as_deref(), limit.0).await?;
        Ok(PageResponse::Ok(Json(ItemPage {
            items: page.items.into_iter().map(ItemView::from).collect(),
            next_cursor: page.next_cursor,
        })))
    }
}
