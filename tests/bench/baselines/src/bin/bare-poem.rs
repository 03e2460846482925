//! A bare poem server: two routes, no middleware.

use poem::{Route, Server, get, handler, listener::TcpListener, web::Json};
use serde::Serialize;

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

#[handler]
fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[handler]
fn me() -> poem::Response {
    poem::Response::builder()
        .content_type("application/json; charset=utf-8")
        .body(trellis_bench_baselines::USER_JSON)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let app = Route::new()
        .at("/healthz", get(healthz))
        .at("/api/v1/users/me", get(me));
    Server::new(TcpListener::bind(trellis_bench_baselines::addr()))
        .run(app)
        .await
}
