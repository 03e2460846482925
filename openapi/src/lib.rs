//! One OpenAPI document for whatever modules are compiled in.
//!
//! # Design
//!
//! [`ModulesApi`] implements `poem_openapi::OpenApi` by hand over the module registry
//! (design (a) of DESIGN.md) instead of merging per-module JSON documents (design (b)):
//!
//! - `meta()` and `register()` are associated functions, and every module declares its API
//!   types through `ModuleBuilder::api`, which records `<T as OpenApi>::meta` and
//!   `::register` as function pointers. So `meta()` can walk the registry without a
//!   context, and the document is produced by poem-openapi itself: its schema registry
//!   deduplicates shared types (`Problem` appears once), its operation-id check and its
//!   unused-schema pruning apply to the whole set, and there is no JSON merging to get wrong.
//! - `add_routes()` takes `self`, which carries the route adders built from the context,
//!   so one `OpenApiService` serves every module's routes, one `/openapi.json` and one
//!   Swagger UI.
//! - The price: what `meta()` sees must be known without `self`, i.e. the compiled-in set.
//!   Trellis chooses modules at build time, so that is exactly the set to document.
//!
//! On top of what each module declares, the document is completed here:
//! - every operation is tagged with its module's name (and the tag carries the module's
//!   description);
//! - every operation documents the problem responses the server's middleware can produce
//!   (400 for unparsable parameters or bodies, 413 and 415 for bodies, 500 for a panic,
//!   503 for a timeout), unless the operation documents that status itself;
//! - every response documents the `X-Request-Id` header.

use std::{collections::HashMap, sync::Arc};

use poem::{
    Endpoint, EndpointExt as _, Request,
    http::{HeaderValue, Method},
};
use poem_openapi::{
    ExtraHeader, LicenseObject, OpenApi, OpenApiService,
    registry::{
        MetaApi, MetaMediaType, MetaResponse, MetaSchema, MetaSchemaRef, MetaTag, Registry,
    },
    types::Type,
};
use trellis_core::{
    ApiMeta, BuildInfo, MountedApi, RouteAdder, RouteTable, declarations,
    problem::{PROBLEM_CONTENT_TYPE, Problem, RequestScope},
    registered_modules,
};

/// The title of the document.
pub const TITLE: &str = "Trellis API";

/// Every compiled-in module's API, as one `OpenApi` value.
pub struct ModulesApi {
    routes: Vec<RouteAdder>,
    index: RouteIndex,
}

impl ModulesApi {
    /// The APIs of a started server; each operation records its route template in the
    /// request scope (for metrics and logs) before it runs.
    pub fn mounted(apis: Vec<MountedApi>, index: RouteIndex) -> Self {
        Self {
            routes: apis.into_iter().map(|api| api.routes).collect(),
            index,
        }
    }

    /// No routes: for producing the document only.
    pub fn document_only() -> Self {
        Self {
            routes: Vec::new(),
            index: RouteIndex::default(),
        }
    }
}

/// Records `template` as the current request's route, then calls the operation.
pub struct RecordRoute<E> {
    template: Arc<str>,
    inner: E,
}

impl<E> RecordRoute<E> {
    /// Wraps `inner`, served under `template`.
    pub fn new(template: impl Into<Arc<str>>, inner: E) -> Self {
        Self {
            template: template.into(),
            inner,
        }
    }
}

impl<E: Endpoint> Endpoint for RecordRoute<E> {
    type Output = E::Output;

    async fn call(&self, req: Request) -> poem::Result<Self::Output> {
        RequestScope::record_route(&self.template);
        self.inner.call(req).await
    }
}

/// The API declarations of the compiled-in modules, in module order. An invalid module set
/// yields none here; the server reports the registry error before it ever gets here.
pub fn compiled_apis() -> Vec<ApiMeta> {
    registered_modules()
        .map(|modules| {
            declarations(&modules)
                .iter()
                .flat_map(|b| b.api_metas().collect::<Vec<_>>())
                .collect()
        })
        .unwrap_or_default()
}

impl OpenApi for ModulesApi {
    fn meta() -> Vec<MetaApi> {
        compiled_apis()
            .into_iter()
            .flat_map(|api| {
                let mut metas = (api.meta)();
                for operation in metas
                    .iter_mut()
                    .flat_map(|m| m.paths.iter_mut())
                    .flat_map(|p| p.operations.iter_mut())
                {
                    if !operation.tags.contains(&api.module) {
                        operation.tags.insert(0, api.module);
                    }
                    let has_body = operation.request.is_some();
                    let has_params = !operation.params.is_empty();
                    let documented: Vec<u16> = operation
                        .responses
                        .responses
                        .iter()
                        .filter_map(|r| r.status)
                        .collect();
                    for (status, description, applies) in [
                        (
                            400,
                            "The parameters or the body could not be parsed",
                            has_body || has_params,
                        ),
                        (413, "The body exceeds the configured size limit", has_body),
                        (415, "The body's content type is not supported", has_body),
                        (
                            500,
                            "An unexpected server error (quote the request id)",
                            true,
                        ),
                        (
                            503,
                            "The request did not complete within the configured timeout",
                            true,
                        ),
                    ] {
                        if applies && !documented.contains(&status) {
                            operation
                                .responses
                                .responses
                                .push(problem_response(status, description));
                        }
                    }
                    operation.responses.responses.sort_by_key(|r| r.status);
                    for param in &mut operation.params {
                        complete_schema_ref(&mut param.schema);
                    }
                }
                metas
            })
            .collect()
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
        for api in compiled_apis() {
            (api.register)(registry);
            registry.tags.insert(MetaTag {
                name: api.module,
                description: (!api.module_description.is_empty()).then_some(api.module_description),
                external_docs: None,
            });
        }
        for schema in registry.schemas.values_mut() {
            complete_schema(schema);
        }
    }

    fn add_routes(self, route_table: &mut RouteTable) {
        let mut scratch = RouteTable::new();
        for add in self.routes {
            add(&mut scratch);
        }
        for (pattern, methods) in scratch {
            let template: Arc<str> = self.index.get(&pattern).map_or_else(
                || Arc::from(pattern.as_str()),
                |route| route.template.clone(),
            );
            let entry = route_table.entry(pattern).or_default();
            for (method, endpoint) in methods {
                entry.insert(method, RecordRoute::new(template.clone(), endpoint).boxed());
            }
        }
    }
}

/// Writes the range of sized integers into the schema (`format: uint32` alone lets clients
/// believe `-1` or `2^40` are acceptable). 64-bit bounds use an exclusive power of two,
/// which a double represents exactly.
fn complete_schema(schema: &mut MetaSchema) {
    if schema.ty == "integer" && schema.minimum.is_none() && schema.maximum.is_none() {
        let (min, max, exclusive) = match schema.format {
            Some("int8") => (f64::from(i8::MIN), f64::from(i8::MAX), false),
            Some("int16") => (f64::from(i16::MIN), f64::from(i16::MAX), false),
            Some("int32") => (f64::from(i32::MIN), f64::from(i32::MAX), false),
            Some("int64") => (-(2f64.powi(63)), 2f64.powi(63), true),
            Some("uint8") => (0.0, f64::from(u8::MAX), false),
            Some("uint16") => (0.0, f64::from(u16::MAX), false),
            Some("uint32") => (0.0, f64::from(u32::MAX), false),
            Some("uint64") => (0.0, 2f64.powi(64), true),
            _ => return,
        };
        schema.minimum = Some(min);
        schema.maximum = Some(max);
        if exclusive {
            schema.exclusive_maximum = Some(true);
        }
    } else if schema.ty == "integer" && schema.format.is_some_and(|f| f.starts_with("uint")) {
        schema.minimum.get_or_insert(0.0);
    }
    for (_, property) in &mut schema.properties {
        complete_schema_ref(property);
    }
    for nested in schema
        .items
        .iter_mut()
        .map(|b| &mut **b)
        .chain(schema.additional_properties.iter_mut().map(|b| &mut **b))
        .chain(schema.all_of.iter_mut())
        .chain(schema.one_of.iter_mut())
        .chain(schema.any_of.iter_mut())
    {
        complete_schema_ref(nested);
    }
}

fn complete_schema_ref(schema: &mut MetaSchemaRef) {
    if let MetaSchemaRef::Inline(schema) = schema {
        complete_schema(schema);
    }
}

fn problem_response(status: u16, description: &'static str) -> MetaResponse {
    MetaResponse {
        description,
        status: Some(status),
        status_range: None,
        content: vec![MetaMediaType {
            content_type: PROBLEM_CONTENT_TYPE,
            schema: Problem::schema_ref(),
        }],
        headers: vec![],
    }
}

/// The service for `api`: document, routes and UI.
pub fn service(api: ModulesApi, build: &BuildInfo) -> OpenApiService<ModulesApi, ()> {
    OpenApiService::new(api, TITLE, build.version)
        .description(
            "Every error is `application/problem+json` (RFC 9457) and carries the request id.",
        )
        // The server that serves the document: clients resolve paths against its origin.
        .server("/")
        .license(LicenseObject::new(env!("CARGO_PKG_LICENSE")))
        .extra_response_header::<String, _>(ExtraHeader::new("X-Request-Id").description(
            "The request id: the caller's own when it sent a sane one, else generated.",
        ))
}

/// The document of the compiled-in modules, as pretty JSON, without starting anything.
pub fn document_json(build: &BuildInfo) -> String {
    finish_document(&service(ModulesApi::document_only(), build).spec())
}

/// The document of the compiled-in modules, as YAML.
pub fn document_yaml(build: &BuildInfo) -> String {
    to_yaml(&document_json(build))
}

/// The JSON document as YAML.
pub fn to_yaml(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|value| serde_yaml::to_string(&value).ok())
        .unwrap_or_default()
}

/// Completes what poem-openapi cannot express: public operations say so (`security: []`),
/// and request bodies are closed objects. Every object schema reachable from a request
/// body gets `additionalProperties: false`, which `trellis_core::payload::JsonBody`
/// enforces (an unknown field is named in the problem).
pub fn finish_document(spec: &str) -> String {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(spec) else {
        return spec.to_owned();
    };
    let mut pending: Vec<String> = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for op in paths
            .values()
            .filter_map(|p| p.as_object())
            .flat_map(|p| p.values())
        {
            if let Some(content) = op["requestBody"]["content"].as_object() {
                for media in content.values() {
                    collect_refs(&media["schema"], &mut pending);
                }
            }
        }
    }
    // An operation that declares no security is public, and says so (`security: []`):
    // an absent one would inherit a root-level requirement.
    if let Some(paths) = doc["paths"].as_object_mut() {
        for op in paths
            .values_mut()
            .filter_map(|p| p.as_object_mut())
            .flat_map(|p| p.values_mut())
            .filter_map(|op| op.as_object_mut())
        {
            op.entry("security")
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        }
    }
    // poem-openapi types every union `object`, even one with a non-object alternative
    // (one event or an array of them); the alternatives carry the types.
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for schema in schemas.values_mut() {
            if schema.get("oneOf").is_some()
                && let Some(object) = schema.as_object_mut()
            {
                object.remove("type");
            }
        }
    }
    let mut closed = std::collections::BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !closed.insert(name.clone()) {
            continue;
        }
        let Some(schema) = doc["components"]["schemas"].get_mut(&name) else {
            continue;
        };
        collect_refs(schema, &mut pending);
        if schema["type"] == "object"
            && schema["properties"]
                .as_object()
                .is_some_and(|p| !p.is_empty())
            && schema.get("additionalProperties").is_none()
            && let Some(object) = schema.as_object_mut()
        {
            object.insert(
                "additionalProperties".into(),
                serde_json::Value::Bool(false),
            );
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| spec.to_owned())
}

fn collect_refs(schema: &serde_json::Value, out: &mut Vec<String>) {
    match schema {
        serde_json::Value::Object(map) => {
            if let Some(name) = map
                .get("$ref")
                .and_then(|r| r.as_str())
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
            {
                out.push(name.to_owned());
            }
            for value in map.values() {
                collect_refs(value, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// A module's route as the router knows it: its OpenAPI template and allowed methods.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    /// The template as the document writes it: `/api/v1/users/{id}`.
    pub template: Arc<str>,
    /// The `Allow` header value for the path.
    pub allow: HeaderValue,
}

impl RouteInfo {
    /// The path variables' names, in order (`id` for `/users/{id}`).
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.template
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
    }
}

/// Module routes keyed by the pattern the router reports (`poem::PathPattern`), whose path
/// variables are renamed `:param0`, `:param1`, … by poem-openapi.
#[derive(Debug, Clone, Default)]
pub struct RouteIndex {
    routes: HashMap<String, RouteInfo>,
}

impl RouteIndex {
    /// Indexes the compiled-in modules' routes.
    pub fn compiled() -> Self {
        let mut methods: HashMap<String, Vec<Method>> = HashMap::new();
        for meta in ModulesApi::meta() {
            for path in meta.paths {
                let entry = methods.entry(path.path).or_default();
                entry.extend(path.operations.into_iter().map(|op| op.method));
            }
        }
        let routes = methods
            .into_iter()
            .map(|(template, mut methods)| {
                if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
                    methods.push(Method::HEAD);
                }
                methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                let allow = methods
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                let info = RouteInfo {
                    template: Arc::from(template.as_str()),
                    allow: HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static("")),
                };
                (router_pattern(&template), info)
            })
            .collect();
        Self { routes }
    }

    /// The route for a router pattern.
    pub fn get(&self, pattern: &str) -> Option<&RouteInfo> {
        self.routes.get(pattern)
    }
}

/// `/users/{id}/details` -> `/users/:param0/details`, as poem-openapi registers it.
fn router_pattern(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut index = 0;
    for segment in template.split('/').filter(|s| !str::is_empty(s)) {
        out.push('/');
        if segment.starts_with('{') && segment.ends_with('}') {
            out.push_str(&format!(":param{index}"));
            index += 1;
        } else {
            out.push_str(segment);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Why the compiled-in APIs cannot be served together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConflictError {
    /// Two modules declare the same operation.
    #[error("modules `{first}` and `{second}` both declare `{method} {path}`")]
    Route {
        /// The method.
        method: String,
        /// The path template.
        path: String,
        /// The first module.
        first: &'static str,
        /// The second module.
        second: &'static str,
    },
    /// Two operations share an operation id.
    #[error("modules `{first}` and `{second}` both use the operation id `{operation_id}`")]
    OperationId {
        /// The id.
        operation_id: &'static str,
        /// The first module.
        first: &'static str,
        /// The second module.
        second: &'static str,
    },
}

/// Checks that no two modules declare the same route or operation id.
pub fn check_conflicts(apis: &[ApiMeta]) -> Result<(), ConflictError> {
    let mut routes: HashMap<(String, String), &'static str> = HashMap::new();
    let mut ids: HashMap<&'static str, &'static str> = HashMap::new();
    for api in apis {
        for path in (api.meta)().into_iter().flat_map(|m| m.paths) {
            for op in path.operations {
                let key = (op.method.to_string(), router_pattern(&path.path));
                if let Some(first) = routes.insert(key, api.module) {
                    return Err(ConflictError::Route {
                        method: op.method.to_string(),
                        path: path.path.clone(),
                        first,
                        second: api.module,
                    });
                }
                if let Some(id) = op.operation_id
                    && let Some(first) = ids.insert(id, api.module)
                {
                    return Err(ConflictError::OperationId {
                        operation_id: id,
                        first,
                        second: api.module,
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_patterns_number_variables_in_order() {
        assert_eq!(router_pattern("/healthz"), "/healthz");
        assert_eq!(
            router_pattern("/api/v1/users/{id}/details/{kind}"),
            "/api/v1/users/:param0/details/:param1"
        );
        assert_eq!(router_pattern("/"), "/");
    }
}
