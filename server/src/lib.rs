//! The Trellis server: configuration -> context -> modules -> routes -> serve -> drain.
//!
//! [`Application::build`] does everything up to binding the listener (port 0 allowed) and
//! exposes the port (and the admin listener's, [`Application::admin_addr`], while
//! `server.admin.enabled`); [`Application::run_until_stopped`] serves until SIGINT, SIGTERM or
//! [`ShutdownHandle::shutdown`], then shuts down within one budget,
//! `server.shutdown_timeout_ms`: `/readyz` answers 503 `draining` at once while the
//! listeners keep serving for `server.shutdown_delay_ms`; then they stop accepting and
//! let open connections finish their requests; then the periodic jobs stop (a run under
//! way may finish), the bus subscribers still running finish, every accepted event is
//! handled, the modules shut down in reverse order, and what is left in the message queue
//! is delivered. Whatever the budget cut short is counted in a [`ShutdownIncomplete`]
//! error.
//!
//! The server never names a module: it finds them through the registry
//! ([`trellis_core::registered_modules`]); `modules.rs` only makes sure the crates the
//! cargo features selected are linked.

pub mod cli;
mod docs;
mod errors;
mod listener;
mod middleware;
mod modules;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use poem::{
    EndpointExt as _, Response, Route,
    endpoint::{BoxEndpoint, EitherEndpoint, make, make_sync},
    middleware::Cors,
};
use tokio::{net::TcpListener, sync::watch, time::Instant};
use trellis_core::{
    AppContext, Assembly, BuildInfo, Extras, ModuleInfo, assemble, client::TrustedProxies,
    config::LoadedConfig, metrics, registered_modules,
};
use trellis_openapi::{ModulesApi, RecordRoute, RouteIndex, check_conflicts, compiled_apis};

pub use middleware::X_REQUEST_ID;

/// How long a scrape of `/metrics` waits for each readiness check; a slower one counts as
/// down in `dependency_up`, well within a scraper's own timeout.
const SCRAPE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Build facts embedded by `build.rs`.
pub fn build_info() -> BuildInfo {
    BuildInfo {
        name: "trellis",
        version: env!("CARGO_PKG_VERSION"),
        git_commit: env!("TRELLIS_GIT_COMMIT"),
        git_branch: env!("TRELLIS_GIT_BRANCH"),
        build_number: env!("TRELLIS_BUILD_NUMBER"),
        build_time: env!("TRELLIS_BUILD_TIME"),
    }
}

/// The OpenAPI document of the compiled-in modules, without starting anything.
pub fn openapi_json() -> String {
    trellis_openapi::document_json(&build_info())
}

/// The OpenAPI document as YAML.
pub fn openapi_yaml() -> String {
    trellis_openapi::document_yaml(&build_info())
}

/// Stops a running [`Application`] as SIGTERM would.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// What a shutdown left undone when its budget (`server.shutdown_timeout_ms`) ran out.
/// The binary exits with code 3 on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, thiserror::Error)]
#[error(
    "the shutdown budget ran out: {connections} connections closed with {requests} requests \
     unanswered, {subscribers} bus subscribers unfinished, {events} event handlers \
     abandoned (delivered again later), {messages} messages undelivered (`server.shutdown_timeout_ms`, \
     `events.drain_timeout_ms`, `mq.drain_timeout_ms`)"
)]
pub struct ShutdownIncomplete {
    /// Connections still open when the requests' share of the budget ended.
    pub connections: usize,
    /// Requests they were serving.
    pub requests: usize,
    /// Bus subscribers still running.
    pub subscribers: usize,
    /// Event handlers still running (their publications are delivered again later).
    pub events: usize,
    /// Messages left in the message queue's buffer.
    pub messages: usize,
}

/// A built server, bound and ready to serve.
pub struct Application {
    ctx: AppContext,
    assembly: Assembly,
    public: Listener,
    admin: Option<Listener>,
    stop: watch::Sender<bool>,
}

/// A bound listener and what it serves: the public one, or the operators'
/// (`[server.admin]`).
struct Listener {
    listener: TcpListener,
    addr: SocketAddr,
    endpoint: Arc<BoxEndpoint<'static, Response>>,
}

impl Application {
    /// Resolves the modules, wires them, runs their init hooks, assembles the routes and
    /// binds the listener.
    pub async fn build(config: LoadedConfig) -> anyhow::Result<Self> {
        Self::build_with(config, Extras::default()).await
    }

    /// [`Application::build`], with what the caller adds: the clock the modules read and
    /// observers of the bus and the events (`trellis-testkit` uses it).
    pub async fn build_with(config: LoadedConfig, extras: Extras) -> anyhow::Result<Self> {
        let modules = registered_modules()?;
        check_conflicts(&compiled_apis())?;
        let infos: Vec<ModuleInfo> = modules.iter().map(|m| ModuleInfo::of(*m)).collect();
        let build = build_info();
        // Installed first, so that what storage, the queue and the modules record while
        // starting is kept.
        let metrics = config
            .config
            .metrics
            .enabled
            .then(|| metrics::install(&config.config.metrics))
            .transpose()?;
        let ctx = AppContext::connect(config, infos, build.clone(), extras).await?;
        let mut assembly = assemble(&modules, &ctx)?;
        assembly.init(&ctx).await?;

        let server = &ctx.config().server;
        let routes = Arc::new(RouteIndex::compiled());
        let apis = std::mem::take(&mut assembly.apis);
        let service =
            trellis_openapi::service(ModulesApi::mounted(apis, (*routes).clone()), &build);

        let json = trellis_openapi::finish_document(&service.spec());
        let yaml = trellis_openapi::to_yaml(&json);
        let mut own = Route::new()
            .at(
                "/openapi.json",
                RecordRoute::new("/openapi.json", static_text("application/json", json)),
            )
            .at(
                "/openapi.yaml",
                RecordRoute::new("/openapi.yaml", static_text("application/yaml", yaml)),
            )
            .nest(
                "/docs",
                RecordRoute::new(
                    "/docs",
                    docs::with_security_headers(service.swagger_ui(), &service.swagger_ui_html()),
                ),
            );
        let metrics_endpoint = metrics.map(|handle| {
            ::metrics::gauge!(
                metrics::BUILD_INFO,
                "version" => build.version,
                "commit" => build.git_commit,
                "build_number" => build.build_number
            )
            .set(1.0);
            tokio::spawn(metrics::upkeep(handle.clone(), Duration::from_secs(5)));
            let storage = ctx.storage().clone();
            let readiness = ctx.readiness().clone();
            RecordRoute::new(
                "/metrics",
                make(move |_| {
                    let (storage, readiness, handle) =
                        (storage.clone(), readiness.clone(), handle.clone());
                    async move {
                        // `dependency_up` follows the checks without waiting for a probe.
                        readiness.run(SCRAPE_CHECK_TIMEOUT).await;
                        storage.record_metrics();
                        metrics::collect();
                        Response::builder()
                            .content_type("text/plain; version=0.0.4; charset=utf-8")
                            .body(handle.render())
                    }
                }),
            )
            .boxed()
        });
        let api = Arc::new(poem::IntoEndpoint::into_endpoint(service));
        // With the admin listener on, `/metrics` is served there only.
        let (public_metrics, admin_metrics) = match server.admin.enabled {
            false => (metrics_endpoint, None),
            true => (None, metrics_endpoint),
        };
        if let Some(metrics) = public_metrics {
            own = own.at("/metrics", metrics);
        }
        let app = middleware::Front {
            own: own.boxed(),
            api: api.clone(),
        };

        let cors_layer = build_cors(&server.cors)?;
        let vary_origin = cors_layer.is_some();

        // Without CORS the stack turns router errors into problems itself; with it, they
        // become problems inside the CORS layer, so that they carry its headers too. That
        // branch is boxed: a future is as large as its largest branch.
        let inner = match cors_layer {
            None => EitherEndpoint::A(app),
            Some(cors) => EitherEndpoint::B(
                middleware::Problems {
                    inner: app,
                    routes: routes.clone(),
                }
                .with(cors)
                .boxed(),
            ),
        };
        let endpoint = stack(inner, &ctx, &routes, vary_origin)?.boxed();
        let public = Listener::bind(
            &server.host,
            server.port,
            "`server.host`, `server.port`",
            endpoint,
        )
        .await?;
        let admin = match server.admin.enabled {
            false => None,
            true => {
                let admin = &server.admin;
                let endpoint = middleware::Admin {
                    metrics: admin_metrics,
                    api,
                };
                let endpoint = stack(endpoint, &ctx, &routes, false)?.boxed();
                let keys = "`server.admin.host`, `server.admin.port`";
                Some(Listener::bind(&admin.host, admin.port, keys, endpoint).await?)
            }
        };

        let (stop, _) = watch::channel(false);
        Ok(Self {
            ctx,
            assembly,
            public,
            admin,
            stop,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.public.addr.port()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.public.addr
    }

    /// The admin listener's address, while `server.admin.enabled`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|admin| admin.addr)
    }

    /// The application context.
    pub fn context(&self) -> &AppContext {
        &self.ctx
    }

    /// What the public listener serves: the whole middleware stack and every route, to
    /// call in process (no socket) as `trellis-testkit` does. Requests carry no peer
    /// address unless the caller sets one.
    pub fn endpoint(&self) -> Arc<BoxEndpoint<'static, Response>> {
        self.public.endpoint.clone()
    }

    /// A handle that stops the server as SIGTERM would.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.stop.clone())
    }

    /// Serves until SIGINT, SIGTERM or the shutdown handle; then shuts down within
    /// `server.shutdown_timeout_ms` (see the crate's documentation). A budget that ran out
    /// is a [`ShutdownIncomplete`] error.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            ctx,
            mut assembly,
            public,
            admin,
            stop,
        } = self;
        let server = &ctx.config().server;
        let limits = listener::Limits {
            header_read: Duration::from_millis(server.header_read_timeout_ms),
            idle: Duration::from_millis(server.idle_timeout_ms),
            max_connections: server.max_connections,
        };
        let budget = Duration::from_millis(server.shutdown_timeout_ms);
        let delay = Duration::from_millis(server.shutdown_delay_ms);
        let admin_addr = admin.as_ref().map(|admin| admin.addr);
        tracing::info!(addr = %public.addr, ?admin_addr, modules = ?ctx.modules().iter().map(|m| m.name).collect::<Vec<_>>(), "trellis is serving");

        assembly.start_jobs(&ctx);
        let connections = listener::Connections::default();
        let serving = async {
            let admin = async {
                if let Some(admin) = admin {
                    connections
                        .serve(admin.listener, admin.endpoint, limits)
                        .await;
                }
            };
            tokio::join!(
                connections.serve(public.listener, public.endpoint, limits),
                admin
            );
        };
        let mut stopped = stop.subscribe();
        let stopping = async {
            tokio::select! {
                () = os_signal() => {},
                _ = stopped.wait_for(|s| *s) => {},
            }
            let deadline = Instant::now() + budget;
            ctx.readiness().begin_draining();
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                budget_ms = budget.as_millis() as u64,
                "shutting down: /readyz answers draining; still serving for the delay"
            );
            tokio::time::sleep_until((Instant::now() + delay).min(deadline)).await;
            connections.stop_accepting();
            tracing::info!("no new connections; finishing the requests under way");
            let unfinished = connections
                .finish(deadline.saturating_duration_since(Instant::now()))
                .await;
            (deadline, unfinished)
        };
        let ((), (deadline, unfinished)) = tokio::join!(serving, stopping);
        // The event handlers under way finish before the modules stop (the publications
        // not yet claimed wait in the database), and what they published is delivered
        // before the process exits.
        let left = || deadline.saturating_duration_since(Instant::now());
        assembly.stop_jobs(deadline).await;
        // What detached bus subscribers were doing may still emit events.
        let subscribers = ctx.bus().drain(deadline).await;
        let events = ctx.stop_events(left()).await;
        assembly.shutdown(&ctx, deadline).await;
        let messages = ctx.close_backends(left()).await;
        let incomplete = ShutdownIncomplete {
            connections: unfinished.connections,
            requests: unfinished.requests,
            subscribers,
            events,
            messages,
        };
        if incomplete != ShutdownIncomplete::default() {
            return Err(incomplete.into());
        }
        tracing::info!("trellis stopped");
        Ok(())
    }
}

impl Listener {
    /// Binds `host:port` for `endpoint`; `keys` name the settings in the error.
    async fn bind(
        host: &str,
        port: u16,
        keys: &str,
        endpoint: BoxEndpoint<'static, Response>,
    ) -> anyhow::Result<Self> {
        let bind = format!("{host}:{port}");
        let listener = TcpListener::bind(&bind)
            .await
            .with_context(|| format!("cannot listen on {bind} ({keys})"))?;
        let addr = listener
            .local_addr()
            .context("the listener has no local address")?;
        Ok(Self {
            listener,
            addr,
            endpoint: Arc::new(endpoint),
        })
    }
}

/// The middleware stack around `inner`.
fn stack<E>(
    inner: E,
    ctx: &AppContext,
    routes: &Arc<RouteIndex>,
    vary_origin: bool,
) -> anyhow::Result<middleware::Stack<E>> {
    let server = &ctx.config().server;
    let proxies = TrustedProxies::new(&server.trusted_proxies, server.forwarded_header)
        .map_err(|bad| anyhow::anyhow!("`server.trusted_proxies`: `{bad}` is not a network"))?;
    Ok(middleware::Stack {
        inner,
        routes: routes.clone(),
        bus: ctx.bus().clone(),
        access_log: ctx.config().telemetry.access_log,
        body_limit: server.body_limit_bytes,
        linger: Duration::from_millis(server.body_linger_ms),
        timeout: Duration::from_millis(server.request_timeout_ms),
        admission: middleware::Admission::new(server.max_in_flight),
        metrics: middleware::RequestMetrics::new(),
        vary_origin,
        proxies: (!proxies.is_empty()).then_some(proxies),
        readiness: ctx.readiness().clone(),
    })
}

/// Serves a fixed text body.
fn static_text(content_type: &'static str, body: String) -> impl poem::Endpoint<Output = Response> {
    make_sync(move |_| {
        Response::builder()
            .content_type(content_type)
            .body(body.clone())
    })
}

async fn os_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// poem's `Cors` for `[server.cors]`, or `None` while no origin is allowed. Checked here,
/// since `Cors` panics on a bad header name and would accept a combination browsers
/// refuse.
fn build_cors(config: &trellis_core::config::CorsConfig) -> anyhow::Result<Option<Cors>> {
    let header_names = |key: &str, names: &[String]| {
        names
            .iter()
            .map(|name| {
                poem::http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    anyhow::anyhow!(
                        "`server.cors.{key}`: `{}` is not a header name",
                        name.escape_debug()
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let allowed_headers = header_names("allowed_headers", &config.allowed_headers)?;
    let exposed_headers = header_names("exposed_headers", &config.exposed_headers)?;
    let any_origin = config.allowed_origins.iter().any(|o| o == "*");
    // Browsers refuse credentials with a wildcard origin; poem would echo every origin
    // instead, which hands any site the user's credentials.
    if any_origin && config.allow_credentials {
        anyhow::bail!(
            "`server.cors.allowed_origins` = [\"*\"] cannot be combined with \
             `server.cors.allow_credentials` = true: list the trusted origins instead"
        );
    }
    if config.allowed_origins.is_empty() {
        return Ok(None);
    }
    let mut cors = Cors::new()
        .allow_credentials(config.allow_credentials)
        .max_age(i32::try_from(config.max_age_ms / 1000).unwrap_or(i32::MAX));
    if !any_origin {
        cors = cors.allow_origins(config.allowed_origins.iter().map(String::as_str));
    }
    for method in &config.allowed_methods {
        let method = poem::http::Method::from_bytes(method.as_bytes()).with_context(|| {
            format!("`server.cors.allowed_methods`: `{method}` is not a method")
        })?;
        cors = cors.allow_method(method);
    }
    Ok(Some(
        cors.allow_headers(allowed_headers)
            .expose_headers(exposed_headers),
    ))
}
