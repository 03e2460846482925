//! Baselines for `tests/bench/run.sh`: the same answers as Trellis's `GET /healthz` and
//! `GET /api/v1/users/me`, with nothing around them. Not part of the default build.

/// The listen address from `BENCH_ADDR` (default `127.0.0.1:18180`).
pub fn addr() -> String {
    std::env::var("BENCH_ADDR").unwrap_or_else(|_| "127.0.0.1:18180".into())
}

/// A user as Trellis returns it, for the `/api/v1/users/me` baseline.
pub const USER_JSON: &str = r#"{"created_at":"2026-01-01T00:00:00.000Z","email":"bench@example.com","first_name":"Bench","id":"00000000-0000-4000-8000-000000000000","last_name":"Mark","updated_at":"2026-01-01T00:00:00.000Z"}"#;
