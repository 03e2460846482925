//! Links the compiled-in module crates. The linker drops a crate nothing refers to, and
//! with it the crate's `inventory` registration; one line per module keeps it in.
//! The server never calls into a module: it finds them through the registry.

#[cfg(feature = "auth")]
use trellis_auth as _;
#[cfg(feature = "bi")]
use trellis_bi as _;
#[cfg(feature = "common")]
use trellis_common as _;
#[cfg(feature = "events")]
use trellis_events as _;
#[cfg(feature = "user")]
use trellis_user as _;
