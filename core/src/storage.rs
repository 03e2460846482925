//! Storage declarations a module makes: its migrations, one SQL text per backend.

/// One schema migration of one module. Versions are per module and ascending; the applied
/// set is recorded per module, so two modules' numbers never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Ascending version within the module.
    pub version: u32,
    /// A short description, e.g. `create users`.
    pub name: &'static str,
    /// The SQL for SQLite.
    pub sqlite: &'static str,
    /// The SQL for PostgreSQL.
    pub postgres: &'static str,
}
