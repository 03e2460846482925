//! The Module contract and the registry.
//!
//! A module is a value implementing [`Module`], registered once per crate with
//! `inventory::submit! { ModuleRegistration::of(&MyModule) }`. The server never names a
//! module: it asks [`registered_modules`] for all of them, in a deterministic order.

use std::collections::{BTreeMap, BTreeSet};

use crate::builder::ModuleBuilder;

/// A feature module: one crate under `modules/`, one value, one registration.
///
/// # Lifecycle
///
/// 1. **Resolve.** The server collects every registered module, rejects a duplicate name or
///    a missing required module (naming it), and orders them: required modules first, ties
///    broken by name, so every start sees the same order.
/// 2. **Build.** [`Module::build`] declares what the module brings: its configuration type,
///    API types, bus handlers and subscribers, event handlers, migrations, readiness checks
///    and init/shutdown hooks. It does no I/O and receives no context: it is also called
///    when only the OpenAPI document is wanted. Anything that needs the running server is a
///    factory closure that receives a [`ModuleContext`](crate::ModuleContext).
/// 3. **Wire.** In module order the server checks each module's configuration section,
///    builds the module's service ([`ModuleBuilder::service`]) from its context, calls the
///    factories (handlers, APIs, checks, jobs) and starts the bus. A factory error stops
///    start-up, naming the module.
/// 4. **Init.** Migrations are applied, then the `on_init` hooks run, in module order, each
///    with its module's context (its configuration, database and cache).
/// 5. **Serve.** Routes are mounted under one middleware stack and one OpenAPI document.
/// 6. **Shutdown.** After the listener stops and in-flight requests finish, the
///    `on_shutdown` hooks run in reverse module order.
pub trait Module: Send + Sync + 'static {
    /// A stable, unique, lower-case name (`user`, `auth`); also the config section
    /// `[modules.<name>]`, the OpenAPI tag and the metrics label.
    fn name(&self) -> &'static str;

    /// The module's version, usually `env!("CARGO_PKG_VERSION")`.
    fn version(&self) -> &'static str;

    /// One sentence for the OpenAPI tag and `/api/v1/modules`.
    fn description(&self) -> &'static str {
        ""
    }

    /// Names of the modules this one needs; start-up fails naming the first missing one.
    fn requires(&self) -> &'static [&'static str] {
        &[]
    }

    /// Declares everything the module brings. See the lifecycle above.
    fn build(&self, module: &mut ModuleBuilder);
}

/// A module's entry in the registry. Exactly one per module crate.
pub struct ModuleRegistration {
    module: &'static dyn Module,
}

impl ModuleRegistration {
    /// Registers `module`.
    pub const fn of(module: &'static dyn Module) -> Self {
        Self { module }
    }

    /// The registered module.
    pub fn module(&self) -> &'static dyn Module {
        self.module
    }
}

inventory::collect!(ModuleRegistration);

impl std::fmt::Debug for dyn Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.name())
            .field("version", &self.version())
            .finish()
    }
}

/// What `/api/v1/modules` and the logs say about a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Its name.
    pub name: &'static str,
    /// Its version.
    pub version: &'static str,
    /// Its description.
    pub description: &'static str,
    /// The modules it requires.
    pub requires: &'static [&'static str],
}

impl ModuleInfo {
    /// Describes `module`.
    pub fn of(module: &dyn Module) -> Self {
        Self {
            name: module.name(),
            version: module.version(),
            description: module.description(),
            requires: module.requires(),
        }
    }
}

/// Why the set of modules cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Two registrations share a name.
    #[error(
        "module `{name}` is registered twice: each module crate submits exactly one registration"
    )]
    Duplicate {
        /// The name.
        name: &'static str,
    },
    /// A module requires one that is not compiled in.
    #[error(
        "module `{module}` requires module `{missing}`, which is not compiled in (enable its cargo feature)"
    )]
    MissingRequirement {
        /// The module with the requirement.
        module: &'static str,
        /// The module it requires.
        missing: &'static str,
    },
    /// Requirements form a cycle.
    #[error("modules {modules:?} require each other in a cycle")]
    Cycle {
        /// The modules on the cycle (and any waiting on them).
        modules: Vec<&'static str>,
    },
    /// A name is empty or not lower-case ASCII.
    #[error("module name `{name}` is invalid: use lower-case letters, digits, `-` or `_`")]
    InvalidName {
        /// The name.
        name: &'static str,
    },
}

/// Every compiled-in module, checked and in start-up order.
pub fn registered_modules() -> Result<Vec<&'static dyn Module>, RegistryError> {
    resolve(
        inventory::iter::<ModuleRegistration>
            .into_iter()
            .map(ModuleRegistration::module)
            .collect(),
    )
}

/// Checks `modules` and orders them: required modules before the modules that need them,
/// otherwise by name.
pub fn resolve(
    modules: Vec<&'static dyn Module>,
) -> Result<Vec<&'static dyn Module>, RegistryError> {
    let mut by_name: BTreeMap<&'static str, &'static dyn Module> = BTreeMap::new();
    for module in &modules {
        let name = module.name();
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(RegistryError::InvalidName { name });
        }
        if by_name.insert(name, *module).is_some() {
            return Err(RegistryError::Duplicate { name });
        }
    }
    for (name, module) in &by_name {
        if let Some(missing) = module.requires().iter().find(|r| !by_name.contains_key(*r)) {
            return Err(RegistryError::MissingRequirement {
                module: name,
                missing,
            });
        }
    }

    // Kahn's algorithm; the ready set is ordered by name, so the result is deterministic.
    let mut pending: BTreeMap<&'static str, BTreeSet<&'static str>> = by_name
        .iter()
        .map(|(name, m)| (*name, m.requires().iter().copied().collect()))
        .collect();
    let mut ordered = Vec::with_capacity(by_name.len());
    while let Some(next) = pending
        .iter()
        .find(|(_, needs)| needs.is_empty())
        .map(|(name, _)| *name)
    {
        pending.remove(next);
        for needs in pending.values_mut() {
            needs.remove(next);
        }
        ordered.push(by_name[next]);
    }
    if !pending.is_empty() {
        return Err(RegistryError::Cycle {
            modules: pending.into_keys().collect(),
        });
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        name: &'static str,
        requires: &'static [&'static str],
    }

    impl Module for Fake {
        fn name(&self) -> &'static str {
            self.name
        }
        fn version(&self) -> &'static str {
            "1.0.0"
        }
        fn requires(&self) -> &'static [&'static str] {
            self.requires
        }
        fn build(&self, _: &mut ModuleBuilder) {}
    }

    fn fake(name: &'static str, requires: &'static [&'static str]) -> &'static dyn Module {
        Box::leak(Box::new(Fake { name, requires }))
    }

    fn names(modules: &[&'static dyn Module]) -> Vec<&'static str> {
        modules.iter().map(|m| m.name()).collect()
    }

    #[test]
    fn order_is_by_name_then_requirements_first() {
        let modules = vec![
            fake("user", &[]),
            fake("auth", &["user"]),
            fake("common", &[]),
            fake("bi", &[]),
        ];
        let ordered = resolve(modules).expect("valid set");
        assert_eq!(names(&ordered), ["bi", "common", "user", "auth"]);
    }

    #[test]
    fn order_does_not_depend_on_registration_order() {
        let a = resolve(vec![fake("b", &[]), fake("a", &[]), fake("c", &["a"])]).expect("ok");
        let b = resolve(vec![fake("c", &["a"]), fake("a", &[]), fake("b", &[])]).expect("ok");
        assert_eq!(names(&a), names(&b));
    }

    #[test]
    fn duplicate_name_is_named() {
        let err = resolve(vec![fake("user", &[]), fake("user", &[])]).expect_err("dup");
        assert_eq!(err, RegistryError::Duplicate { name: "user" });
        assert!(err.to_string().contains("`user`"));
    }

    #[test]
    fn missing_requirement_names_both_modules() {
        let err = resolve(vec![fake("auth", &["user"])]).expect_err("missing");
        assert_eq!(
            err,
            RegistryError::MissingRequirement {
                module: "auth",
                missing: "user"
            }
        );
    }

    #[test]
    fn cycles_are_rejected() {
        let err = resolve(vec![fake("a", &["b"]), fake("b", &["a"])]).expect_err("cycle");
        assert!(matches!(err, RegistryError::Cycle { .. }));
    }

    #[test]
    fn invalid_names_are_rejected() {
        let err = resolve(vec![fake("User Module", &[])]).expect_err("invalid");
        assert!(matches!(err, RegistryError::InvalidName { .. }));
    }
}
