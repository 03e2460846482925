//! The repository: the module's SQL, its migrations and its row type.

use trellis_core::storage::{DbError, Migration, ModuleDb};

use crate::domain::{Item, Title};

/// The module's migrations, applied in order at start-up.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create items",
    sqlite: CREATE_ITEMS,
    postgres: CREATE_ITEMS,
}];

const CREATE_ITEMS: &str = include_str!("../migrations/0001_create_items.sql");

/// A row as stored; it becomes a domain [`Item`] before leaving the repository.
type Row = (String, String, i64);

fn item((id, title, created_at): Row) -> Item {
    Item {
        id,
        title,
        created_at,
    }
}

/// The items table.
#[derive(Clone)]
pub struct ItemRepo {
    db: ModuleDb,
}

impl ItemRepo {
    /// The repository over the module's database handle.
    pub fn new(db: ModuleDb) -> Self {
        Self { db }
    }

    /// Stores a new item.
    pub async fn insert(&self, id: &str, title: &Title, created_at: i64) -> Result<(), DbError> {
        self.db
            .run(
                "insert_item",
                sqlx::query(
                    "INSERT INTO {{name}}_items (id, title, created_at) VALUES ($1, $2, $3)",
                )
                .bind(id)
                .bind(title.as_str())
                .bind(created_at)
                .execute(self.db.pool()),
            )
            .await?;
        Ok(())
    }

    /// The item with `id`, if any.
    pub async fn get(&self, id: &str) -> Result<Option<Item>, DbError> {
        let row: Option<Row> = self
            .db
            .run(
                "get_item",
                sqlx::query_as("SELECT id, title, created_at FROM {{name}}_items WHERE id = $1")
                    .bind(id)
                    .fetch_optional(self.db.pool()),
            )
            .await?;
        Ok(row.map(item))
    }

    /// Up to `limit` items whose id sorts after `after`, in id order.
    pub async fn list_after(&self, after: &str, limit: u32) -> Result<Vec<Item>, DbError> {
        let rows: Vec<Row> = self
            .db
            .run(
                "list_items",
                sqlx::query_as(
                    "SELECT id, title, created_at FROM {{name}}_items WHERE id > $1 \
                     ORDER BY id LIMIT $2",
                )
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(self.db.pool()),
            )
            .await?;
        Ok(rows.into_iter().map(item).collect())
    }
}
