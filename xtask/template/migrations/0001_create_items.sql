-- Items of the {{name}} module. The same SQL runs on SQLite and PostgreSQL.
CREATE TABLE {{name}}_items (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
