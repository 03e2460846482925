//! A bare poem-openapi server: the same two operations, typed, no middleware.

use poem::{Server, listener::TcpListener};
use poem_openapi::{ApiResponse, Object, OpenApi, OpenApiService, payload::Json};

#[derive(Object)]
struct Health {
    status: String,
}

#[derive(Object)]
struct User {
    id: String,
    email: String,
    first_name: String,
    last_name: String,
    created_at: String,
    updated_at: String,
}

#[derive(ApiResponse)]
enum HealthResponse {
    #[oai(status = 200)]
    Ok(Json<Health>),
}

#[derive(ApiResponse)]
enum UserResponse {
    #[oai(status = 200)]
    Ok(Json<User>),
}

struct Api;

#[OpenApi]
impl Api {
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> HealthResponse {
        HealthResponse::Ok(Json(Health {
            status: "ok".into(),
        }))
    }

    #[oai(path = "/api/v1/users/me", method = "get")]
    async fn me(&self) -> UserResponse {
        UserResponse::Ok(Json(User {
            id: "00000000-0000-4000-8000-000000000000".into(),
            email: "bench@example.com".into(),
            first_name: "Bench".into(),
            last_name: "Mark".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            updated_at: "2026-01-01T00:00:00.000Z".into(),
        }))
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let service = OpenApiService::new(Api, "bare", "1.0");
    Server::new(TcpListener::bind(trellis_bench_baselines::addr()))
        .run(service)
        .await
}
