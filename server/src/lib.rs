//! The Trellis server: configuration -> context -> modules -> routes -> serve -> drain.
//!
//! [`Application::build`] does everything up to binding the listener (port 0 allowed) and
//! exposes the port (and the admin listener's, [`Application::admin_addr`], while
//! `server.admin.enabled`); [`Application::run_until_stopped`] serves until SIGINT, SIGTERM or
//! [`ShutdownHandle::shutdown`], lets in-flight requests finish within
//! `server.shutdown_timeout_ms`, handles every accepted event, shuts the modules down in
//! reverse order, and delivers what is left in the message queue.
//!
//! The server never names a module: it finds them through the registry
//! ([`trellis_core::registered_modules`]); `modules.rs` only makes sure the crates the
//! cargo features selected are linked.

pub mod cli;
mod docs;
mod errors;
mod middleware;
mod modules;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use poem::{
    EndpointExt as _, Response, Route,
    endpoint::{EitherEndpoint, make_sync},
    listener::{Acceptor as _, TcpAcceptor},
    middleware::Cors,
};
use tokio::sync::watch;
use trellis_core::{
    AppContext, Assembly, BuildInfo, ModuleInfo, assemble,
    client::TrustedProxies,
    config::LoadedConfig,
    metrics,
    mq::MessageQueue,
    readiness::NamedCheck,
    registered_modules,
    storage::{Storage, migrate},
};
use trellis_openapi::{ModulesApi, RecordRoute, RouteIndex, check_conflicts, compiled_apis};

pub use middleware::X_REQUEST_ID;

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

/// A built server, bound and ready to serve.
pub struct Application {
    ctx: AppContext,
    assembly: Assembly,
    acceptor: TcpAcceptor,
    addr: SocketAddr,
    endpoint: poem::endpoint::BoxEndpoint<'static, Response>,
    admin: Option<AdminListener>,
    stop: watch::Sender<bool>,
}

/// The operators' listener, `[server.admin]`.
struct AdminListener {
    acceptor: TcpAcceptor,
    addr: SocketAddr,
    endpoint: poem::endpoint::BoxEndpoint<'static, Response>,
}

impl Application {
    /// Resolves the modules, wires them, runs their init hooks, assembles the routes and
    /// binds the listener.
    pub async fn build(config: LoadedConfig) -> anyhow::Result<Self> {
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
        let storage = Storage::connect(&config.config).await?;
        tracing::info!(
            database = storage.database.backend().as_str(),
            cache = storage.cache.kind(),
            "storage connected"
        );
        let queue = MessageQueue::connect(&config.config.mq).await?;
        tracing::info!(backend = queue.backend(), "message queue connected");
        let core_checks = core_checks(&storage, &queue);
        let ctx = AppContext::new(config, infos, build.clone(), storage, queue);
        let mut assembly = assemble(&modules, &ctx, core_checks)?;
        migrate(ctx.database(), &assembly.migrations).await?;
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
            let database = ctx.database().clone();
            RecordRoute::new(
                "/metrics",
                make_sync(move |_| {
                    database.record_pool_metrics();
                    Response::builder()
                        .content_type("text/plain; version=0.0.4; charset=utf-8")
                        .body(handle.render())
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
        let (acceptor, addr) =
            bind(&server.host, server.port, "`server.host`, `server.port`").await?;
        let admin = match server.admin.enabled {
            false => None,
            true => {
                let admin = &server.admin;
                let endpoint = middleware::Admin {
                    metrics: admin_metrics,
                    api,
                };
                let endpoint = stack(endpoint, &ctx, &routes, false)?.boxed();
                let (acceptor, addr) = bind(
                    &admin.host,
                    admin.port,
                    "`server.admin.host`, `server.admin.port`",
                )
                .await?;
                Some(AdminListener {
                    acceptor,
                    addr,
                    endpoint,
                })
            }
        };

        let (stop, _) = watch::channel(false);
        Ok(Self {
            ctx,
            assembly,
            acceptor,
            addr,
            endpoint,
            admin,
            stop,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, while `server.admin.enabled`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|admin| admin.addr)
    }

    /// The application context.
    pub fn context(&self) -> &AppContext {
        &self.ctx
    }

    /// A handle that stops the server as SIGTERM would.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.stop.clone())
    }

    /// Serves until SIGINT, SIGTERM or the shutdown handle; then drains and shuts the
    /// modules down in reverse order.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            ctx,
            assembly,
            acceptor,
            addr,
            endpoint,
            admin,
            stop,
        } = self;
        let grace = Duration::from_millis(ctx.config().server.shutdown_timeout_ms);
        let admin_addr = admin.as_ref().map(|admin| admin.addr);
        tracing::info!(%addr, ?admin_addr, modules = ?ctx.modules().iter().map(|m| m.name).collect::<Vec<_>>(), "trellis is serving");
        let mut stopped = stop.subscribe();
        let signal_stop = stop.clone();
        let signal = async move {
            tokio::select! {
                () = os_signal() => {
                    signal_stop.send_replace(true);
                },
                _ = stopped.wait_for(|s| *s) => {},
            }
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: no new connections; finishing in-flight requests"
            );
        };
        let public = async {
            let served = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(endpoint, signal, Some(grace))
                .await;
            // Should the public listener fail, the admin listener stops too.
            stop.send_replace(true);
            served.context("the server stopped with an error")
        };
        let mut admin_stopped = stop.subscribe();
        let admin = async move {
            let Some(admin) = admin else {
                return Ok(());
            };
            let signal = async move {
                let _ = admin_stopped.wait_for(|s| *s).await;
            };
            poem::Server::new_with_acceptor(admin.acceptor)
                .run_with_graceful_shutdown(admin.endpoint, signal, Some(grace))
                .await
                .context("the admin listener stopped with an error")
        };
        let (public, admin) = tokio::join!(public, admin);
        public?;
        admin?;
        // Accepted events are handled before the modules stop, and what their handlers
        // published is delivered before the process exits.
        let unhandled = ctx.events().drain().await;
        assembly.shutdown(&ctx, grace).await;
        let undelivered = ctx.queue().close().await;
        ctx.database().close().await;
        if unhandled + undelivered > 0 {
            anyhow::bail!(
                "stopped with {unhandled} accepted events unhandled and {undelivered} messages \
                 undelivered (`events.drain_timeout_ms`, `mq.drain_timeout_ms`)"
            );
        }
        tracing::info!("trellis stopped");
        Ok(())
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
        timeout: Duration::from_millis(server.request_timeout_ms),
        metrics: middleware::RequestMetrics::new(),
        vary_origin,
        proxies: (!proxies.is_empty()).then_some(proxies),
    })
}

/// Binds `host:port`; `keys` name the settings in the error.
async fn bind(host: &str, port: u16, keys: &str) -> anyhow::Result<(TcpAcceptor, SocketAddr)> {
    let bind = format!("{host}:{port}");
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .with_context(|| format!("cannot listen on {bind} ({keys})"))?;
    let acceptor = TcpAcceptor::from_tokio(listener)?;
    let addr = acceptor
        .local_addr()
        .first()
        .and_then(|a| a.as_socket_addr().copied())
        .context("the listener has no local address")?;
    Ok((acceptor, addr))
}

/// Serves a fixed text body.
fn static_text(content_type: &'static str, body: String) -> impl poem::Endpoint<Output = Response> {
    make_sync(move |_| {
        Response::builder()
            .content_type(content_type)
            .body(body.clone())
    })
}

/// Core's readiness checks: the database (down when unreachable), the cache (degraded
/// when unreachable: requests fall back to the database) and the message queue (degraded
/// when unreachable: messages wait in its buffer).
fn core_checks(storage: &Storage, queue: &MessageQueue) -> Vec<NamedCheck> {
    let database = storage.database.clone();
    let cache = storage.cache.clone();
    let queue = queue.clone();
    vec![
        NamedCheck {
            owner: "core",
            name: "database",
            check: Arc::new(move || {
                let database = database.clone();
                async move { database.ping().await }
            }),
        },
        NamedCheck {
            owner: "core",
            name: "cache",
            check: Arc::new(move || {
                let cache = cache.clone();
                async move { cache.ping().await }
            }),
        },
        NamedCheck {
            owner: "core",
            name: "queue",
            check: Arc::new(move || {
                let queue = queue.clone();
                async move { queue.check().await }
            }),
        },
    ]
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
        .max_age(config.max_age_secs);
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
