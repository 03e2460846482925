//! Trellis core: what every module and the server share.
//!
//! - the [`Module`] contract, its [`ModuleBuilder`] and the registry ([`registered_modules`]);
//! - [`assemble`]: the start-up step that builds and wires the modules;
//! - the [`bus`] (request/response and publish/subscribe between modules), the
//!   [`contracts`] modules share, and [`auth`], the authentication extension point;
//! - [`config`] (figment layers), [`telemetry`] (tracing) and [`metrics`] (Prometheus);
//! - [`problem`]: `application/problem+json` errors; [`payload`]: strict JSON bodies;
//!   [`client`]: the address per-client limits are keyed by;
//! - [`readiness`] checks, [`storage`] (database, migrations, cache), domain [`events`]
//!   (recorded in the transaction of their change, delivered at least once by a relay)
//!   and the message queue `mq` (file or SQS);
//! - `jobs`: periodic jobs, each period's run on one instance.
//!
//! Core depends on no module. Modules depend on core only, never on each other.
//!
//! # Cargo features
//!
//! All on by default; a module turns on what it needs, the server picks the drivers.
//!
//! | feature | brings |
//! |---|---|
//! | `storage` | the database ([`storage::Database`], [`storage::ModuleDb`]), migrations, `jobs` |
//! | `sqlite`, `postgres` | the database drivers (`storage` included) |
//! | `queue` | the message queue `mq` with its file backend |
//! | `sqs` | the message queue's SQS backend (`queue` included) |
//! | `redis` | the Redis cache store |

#![warn(missing_docs)]

mod assembly;
pub mod auth;
#[cfg(any(feature = "queue", feature = "storage"))]
mod backoff;
mod builder;
pub mod bus;
pub mod client;
pub mod clock;
pub mod config;
mod context;
pub mod contracts;
pub mod events;
#[cfg(feature = "storage")]
pub mod jobs;
pub mod metrics;
mod module;
#[cfg(feature = "queue")]
pub mod mq;
pub mod payload;
pub mod problem;
pub mod readiness;
pub mod storage;
pub mod telemetry;

pub use assembly::{Assembly, MountedApi, assemble, declarations};
pub use builder::{
    ApiMeta, FactoryResult, Hook, ModuleBuilder, RouteAdder, RouteTable, ServiceBuilder,
};
pub use context::{AppContext, BuildInfo, Extras, ModuleContext};
pub use module::{
    Module, ModuleInfo, ModuleRegistration, RegistryError, registered_modules, resolve,
};

/// Re-exported so module crates register with the same `inventory` as core.
pub use inventory;
