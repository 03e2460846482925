//! [`JsonBody`]: a strict JSON request body whose failures name every offending field.
//!
//! poem-openapi's `Json<T>` stops at the first problem, accepts some type mismatches (a
//! number where a string is declared) and names no field for a missing or mistyped one.
//! `JsonBody<T>` first checks the value against `T`'s own OpenAPI schema (types, required
//! fields, lengths, ranges, item counts, enumerations), collecting one [`FieldViolation`]
//! per offending field with a JSON pointer (`/events/3/name`), and only then lets
//! poem-openapi parse it. The schema is built once per type and cached.

use std::{
    any::TypeId,
    collections::HashMap,
    sync::{Arc, LazyLock, RwLock},
};

use poem::{FromRequest, IntoResponse, Request, RequestBody, http::StatusCode};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
    error::ContentTypeError,
    payload::{ParsePayload, Payload},
    registry::{MetaMediaType, MetaRequest, MetaSchema, MetaSchemaRef, Registry},
    types::{ParseFromJSON, Type},
};
use serde_json::Value;

use crate::problem::{FieldViolation, Problem, ProblemJson};

/// A JSON request body checked against its schema before parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonBody<T>(pub T);

impl<T> std::ops::Deref for JsonBody<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Type> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn check_content_type(content_type: &str) -> bool {
        matches!(content_type.parse::<mime::Mime>(), Ok(mime)
            if mime.type_() == "application"
                && (mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json")))
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

/// Parses `data` into `T` after checking it against `T`'s schema.
fn parse_checked<T: ParseFromJSON + 'static>(data: &[u8]) -> poem::Result<T> {
    let value = if data.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(data)
            .map_err(|e| invalid(format!("the body is not valid JSON: {e}"), Vec::new()))?
    };
    let violations = check_against::<T>(&value);
    if !violations.is_empty() {
        let detail = match violations.as_slice() {
            [one] => format!("`{}` {}", display_field(&one.field), one.message),
            many => format!("{} fields are invalid", many.len()),
        };
        return Err(invalid(detail, violations));
    }
    T::parse_from_json(Some(value)).map_err(|e| {
        let message = e.into_message();
        let violations = violations_in_message(&message);
        invalid(message, violations)
    })
}

impl<T: ParseFromJSON + 'static> ParsePayload for JsonBody<T> {
    const IS_REQUIRED: bool = T::IS_REQUIRED;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let data = <Vec<u8> as FromRequest>::from_request(request, body).await?;
        parse_checked(&data).map(Self)
    }
}

/// A [`JsonBody`] for high-volume bodies: a valid body is deserialized straight into `T`
/// with serde, without building a `serde_json::Value`, checking it against the schema and
/// converting it (three passes that took 40% of the CPU of a BI ingest load,
/// tests/bench/RESULTS.md). Any body serde refuses goes the [`JsonBody`] way, so the
/// client gets the same field-by-field report.
///
/// Only for types whose `Deserialize` refuses everything their schema refuses: closed
/// objects (`deny_unknown_fields`), required fields without defaults, [`Matching`]
/// strings, and no poem-openapi validators (serde does not know them). Test that with
/// [`typed_accepts_only_schema_valid`] over hostile inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedJsonBody<T>(pub T);

impl<T: Type> Payload for TypedJsonBody<T> {
    const CONTENT_TYPE: &'static str = <JsonBody<T> as Payload>::CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        <JsonBody<T> as Payload>::check_content_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: ParseFromJSON + serde::de::DeserializeOwned + 'static> ParsePayload for TypedJsonBody<T> {
    const IS_REQUIRED: bool = T::IS_REQUIRED;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let data = <Vec<u8> as FromRequest>::from_request(request, body).await?;
        match serde_json::from_slice(&data) {
            Ok(parsed) => Ok(Self(parsed)),
            Err(_) => parse_checked(&data).map(Self),
        }
    }
}

/// Whether serde accepts `data` only if the schema path ([`JsonBody`]) accepts it too: the
/// property a [`TypedJsonBody`] type must have. For its tests. (The converse need not
/// hold: what serde refuses goes the schema way.)
pub fn typed_accepts_only_schema_valid<T>(data: &[u8]) -> bool
where
    T: ParseFromJSON + serde::de::DeserializeOwned + 'static,
{
    serde_json::from_slice::<T>(data).is_err() || parse_checked::<T>(data).is_ok()
}

/// The extractor both body types share: the content type, then the payload.
macro_rules! json_extractor {
    ($body:ident, $($bound:tt)+) => {
        impl<'a, T: $($bound)+> ApiExtractor<'a> for $body<T> {
            const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

            type ParamType = ();
            type ParamRawType = ();

            fn register(registry: &mut Registry) {
                <Self as Payload>::register(registry);
            }

            fn request_meta() -> Option<MetaRequest> {
                Some(MetaRequest {
                    description: None,
                    content: vec![MetaMediaType {
                        content_type: <Self as Payload>::CONTENT_TYPE,
                        schema: <Self as Payload>::schema_ref(),
                    }],
                    required: <Self as ParsePayload>::IS_REQUIRED,
                })
            }

            async fn from_request(
                request: &'a Request,
                body: &mut RequestBody,
                _param_opts: ExtractParamOptions<Self::ParamType>,
            ) -> poem::Result<Self> {
                match request.content_type() {
                    Some(content_type) if Self::check_content_type(content_type) => {
                        <Self as ParsePayload>::from_request(request, body).await
                    }
                    Some(content_type) => Err(ContentTypeError::NotSupported {
                        content_type: content_type.to_owned(),
                    }
                    .into()),
                    None => Err(ContentTypeError::ExpectContentType.into()),
                }
            }
        }
    };
}

json_extractor!(JsonBody, ParseFromJSON + 'static);
json_extractor!(
    TypedJsonBody,
    ParseFromJSON + serde::de::DeserializeOwned + 'static
);

fn invalid(detail: String, violations: Vec<FieldViolation>) -> poem::Error {
    let problem = Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-body",
        "Invalid request body",
    )
    .with_detail(detail)
    .with_errors(violations);
    poem::Error::from_response(ProblemJson::new(problem).into_response())
}

fn display_field(pointer: &str) -> &str {
    if pointer.is_empty() {
        "(body)"
    } else {
        pointer
    }
}

type SchemaCache = RwLock<HashMap<TypeId, Arc<(MetaSchemaRef, Registry)>>>;

static SCHEMAS: LazyLock<SchemaCache> = LazyLock::new(Default::default);

fn schema_of<T: Type + 'static>() -> Arc<(MetaSchemaRef, Registry)> {
    let key = TypeId::of::<T>();
    if let Some(found) = SCHEMAS
        .read()
        .ok()
        .and_then(|cache| cache.get(&key).cloned())
    {
        return found;
    }
    let mut registry = Registry::new();
    T::register(&mut registry);
    let entry = Arc::new((T::schema_ref(), registry));
    if let Ok(mut cache) = SCHEMAS.write() {
        cache.insert(key, entry.clone());
    }
    entry
}

/// Checks `value` against `T`'s schema; one violation per offending field.
pub fn check_against<T: Type + 'static>(value: &Value) -> Vec<FieldViolation> {
    let schema = schema_of::<T>();
    let mut checker = Checker {
        registry: &schema.1,
        out: Vec::new(),
    };
    if value.is_null() {
        if T::IS_REQUIRED {
            checker.push("", "a JSON body is required");
        }
    } else {
        checker.check(value, &schema.0, &mut String::new(), 0);
    }
    checker.out
}

/// What a [`Matching`] string must look like.
pub trait StringRule: Send + Sync + 'static {
    /// The regular expression (documented as the schema's `pattern`).
    const PATTERN: &'static str;
    /// The most characters (the schema's `maxLength`).
    const MAX_CHARS: usize;
}

/// A string that matches `R::PATTERN` and has at most `R::MAX_CHARS` characters,
/// documented as such. Use it instead of poem-openapi's `pattern` validator on hot paths:
/// that one compiles its regular expression on every check; this one compiles it once.
pub struct Matching<R>(String, std::marker::PhantomData<R>);

impl<R> Matching<R> {
    /// The string.
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl<R> std::fmt::Debug for Matching<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<R: StringRule> Type for Matching<R> {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> std::borrow::Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            pattern: Some(R::PATTERN.to_owned()),
            max_length: Some(R::MAX_CHARS),
            ..MetaSchema::new("string")
        }))
    }

    fn as_raw_value(&self) -> Option<&String> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl<R: StringRule> ParseFromJSON for Matching<R> {
    fn parse_from_json(value: Option<Value>) -> poem_openapi::types::ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(text)
                if text.chars().count() <= R::MAX_CHARS && matches_pattern(R::PATTERN, &text) =>
            {
                Ok(Self(text, std::marker::PhantomData))
            }
            Value::String(_) => Err(poem_openapi::types::ParseError::custom(format!(
                "does not match the pattern `{}` (at most {} characters)",
                R::PATTERN,
                R::MAX_CHARS
            ))),
            other => Err(poem_openapi::types::ParseError::expected_type(other)),
        }
    }
}

impl<'de, R: StringRule> serde::Deserialize<'de> for Matching<R> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.chars().count() <= R::MAX_CHARS && matches_pattern(R::PATTERN, &text) {
            Ok(Self(text, std::marker::PhantomData))
        } else {
            Err(serde::de::Error::custom("does not match its pattern"))
        }
    }
}

impl<R: StringRule> poem_openapi::types::ToJSON for Matching<R> {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

/// Whether `value` matches the schema's `pattern` (compiled once per pattern). A pattern
/// that does not compile is left to poem-openapi's own validator.
fn matches_pattern(pattern: &str, value: &str) -> bool {
    type Compiled = HashMap<String, Option<regex::Regex>, foldhash::fast::RandomState>;
    static COMPILED: LazyLock<RwLock<Compiled>> = LazyLock::new(Default::default);
    if let Some(compiled) = COMPILED
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(pattern)
    {
        return compiled.as_ref().is_none_or(|r| r.is_match(value));
    }
    let compiled = regex::Regex::new(pattern).ok();
    let matches = compiled.as_ref().is_none_or(|r| r.is_match(value));
    COMPILED
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(pattern.to_owned(), compiled);
    matches
}

/// The schema type a JSON value has (`integer` for whole numbers).
fn kind_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

const MAX_DEPTH: usize = 64;
const MAX_VIOLATIONS: usize = 100;

struct Checker<'r> {
    registry: &'r Registry,
    out: Vec<FieldViolation>,
}

impl Checker<'_> {
    fn push(&mut self, pointer: &str, message: impl Into<String>) {
        if self.out.len() < MAX_VIOLATIONS {
            self.out.push(FieldViolation::new("body", pointer, message));
        }
    }

    fn check(&mut self, value: &Value, schema: &MetaSchemaRef, pointer: &mut String, depth: usize) {
        if depth > MAX_DEPTH {
            self.push(pointer, "is nested too deeply");
            return;
        }
        let Some(schema) = resolve(self.registry, schema) else {
            return;
        };
        if value.is_null() {
            // An optional nested object is `allOf: [$ref]`: its part carries the type.
            let typed = std::iter::once(schema)
                .chain(
                    schema
                        .all_of
                        .iter()
                        .filter_map(|p| resolve(self.registry, p)),
                )
                .find(|s| !s.ty.is_empty() && !s.nullable);
            if let Some(typed) = typed.filter(|_| !schema.nullable) {
                self.push(pointer, format!("must be {}, not null", expected(typed)));
            }
            return;
        }
        for part in &schema.all_of {
            self.check(value, part, pointer, depth + 1);
        }
        let alternatives: Vec<&MetaSchemaRef> =
            schema.one_of.iter().chain(&schema.any_of).collect();
        if !alternatives.is_empty() {
            let fits = alternatives.iter().any(|alt| {
                let mut probe = Checker {
                    registry: self.registry,
                    out: Vec::new(),
                };
                probe.check(value, alt, &mut pointer.clone(), depth + 1);
                probe.out.is_empty()
            });
            if fits {
                return;
            }
            // When exactly one shape has the value's JSON type (an object, or an array of
            // them), its own violations say best what is wrong.
            let same_kind: Vec<_> = alternatives
                .iter()
                .filter(|alt| resolve(self.registry, alt).is_some_and(|s| s.ty == kind_type(value)))
                .collect();
            match same_kind.as_slice() {
                [only] => self.check(value, only, pointer, depth + 1),
                _ => self.push(pointer, "matches none of the allowed shapes"),
            }
            return;
        }
        if !schema.enum_items.is_empty() && !schema.enum_items.contains(value) {
            let allowed: Vec<String> = schema.enum_items.iter().map(Value::to_string).collect();
            self.push(pointer, format!("must be one of {}", allowed.join(", ")));
            return;
        }
        match (schema.ty, value) {
            ("object", Value::Object(map)) => {
                for name in &schema.required {
                    if map.get(*name).is_none_or(Value::is_null) {
                        let field = child(pointer, name);
                        self.push(&field, "is required");
                    }
                }
                if schema.additional_properties.is_none() && !schema.properties.is_empty() {
                    // Request bodies are closed (the document says
                    // `additionalProperties: false`): a misspelt field is an error, not
                    // silently ignored.
                    for name in map.keys() {
                        if schema.properties.iter().all(|(p, _)| p != name) {
                            let field = child(pointer, name);
                            self.push(&field, "is not a known field");
                        }
                    }
                }
                for (name, property) in &schema.properties {
                    // A required field that is null was reported above.
                    if let Some(v) = map
                        .get(*name)
                        .filter(|v| !(v.is_null() && schema.required.contains(name)))
                    {
                        let len = pointer.len();
                        push_segment(pointer, name);
                        self.check(v, property, pointer, depth + 1);
                        pointer.truncate(len);
                    }
                }
                if let Some(additional) = &schema.additional_properties {
                    for (name, v) in map {
                        if schema.properties.iter().all(|(p, _)| p != name) {
                            let len = pointer.len();
                            push_segment(pointer, name);
                            self.check(v, additional, pointer, depth + 1);
                            pointer.truncate(len);
                        }
                    }
                }
                self.check_count(
                    pointer,
                    map.len(),
                    schema.min_properties,
                    schema.max_properties,
                    "properties",
                );
            }
            ("array", Value::Array(items)) => {
                self.check_count(
                    pointer,
                    items.len(),
                    schema.min_items,
                    schema.max_items,
                    "items",
                );
                if let Some(item_schema) = &schema.items {
                    for (index, item) in items.iter().enumerate() {
                        let len = pointer.len();
                        pointer.push('/');
                        pointer.push_str(&index.to_string());
                        self.check(item, item_schema, pointer, depth + 1);
                        pointer.truncate(len);
                        if self.out.len() >= MAX_VIOLATIONS {
                            break;
                        }
                    }
                }
            }
            ("string", Value::String(s)) => {
                let chars = s.chars().count();
                self.check_count(
                    pointer,
                    chars,
                    schema.min_length,
                    schema.max_length,
                    "characters",
                );
                if let Some(pattern) = &schema.pattern
                    && !matches_pattern(pattern, s)
                {
                    self.push(pointer, format!("does not match the pattern `{pattern}`"));
                }
                if schema.format == Some("date-time")
                    && time::OffsetDateTime::parse(
                        s,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .is_err()
                {
                    self.push(
                        pointer,
                        "must be an RFC 3339 date-time, e.g. `2026-11-24T10:00:00Z`",
                    );
                }
            }
            ("integer", Value::Number(n)) => match integer_range(schema.format) {
                Some((min, max)) => match n.as_i128() {
                    Some(i) if i >= min && i <= max => self.check_range(pointer, i as f64, schema),
                    Some(_) => {
                        self.push(pointer, format!("is out of range for {}", expected(schema)))
                    }
                    None => self.push(pointer, format!("must be {}", expected(schema))),
                },
                None => self.check_range(pointer, n.as_f64().unwrap_or_default(), schema),
            },
            ("number", Value::Number(n)) => {
                self.check_range(pointer, n.as_f64().unwrap_or_default(), schema);
            }
            ("boolean", Value::Bool(_)) | ("", _) => {}
            (_, found) => {
                self.push(
                    pointer,
                    format!("must be {}, not {}", expected(schema), kind(found)),
                );
            }
        }
    }

    fn check_count(
        &mut self,
        pointer: &str,
        n: usize,
        min: Option<usize>,
        max: Option<usize>,
        unit: &str,
    ) {
        if let Some(min) = min
            && n < min
        {
            self.push(pointer, format!("must have at least {min} {unit}"));
        }
        if let Some(max) = max
            && n > max
        {
            self.push(pointer, format!("must have at most {max} {unit}"));
        }
    }

    fn check_range(&mut self, pointer: &str, n: f64, schema: &MetaSchema) {
        if let Some(max) = schema.maximum {
            let exclusive = schema.exclusive_maximum.unwrap_or(false);
            if n > max || (exclusive && n >= max) {
                self.push(
                    pointer,
                    format!(
                        "must be {} {max}",
                        if exclusive { "below" } else { "at most" }
                    ),
                );
            }
        }
        if let Some(min) = schema.minimum {
            let exclusive = schema.exclusive_minimum.unwrap_or(false);
            if n < min || (exclusive && n <= min) {
                self.push(
                    pointer,
                    format!(
                        "must be {} {min}",
                        if exclusive { "above" } else { "at least" }
                    ),
                );
            }
        }
    }
}

fn resolve<'s>(registry: &'s Registry, schema: &'s MetaSchemaRef) -> Option<&'s MetaSchema> {
    match schema {
        MetaSchemaRef::Inline(schema) => Some(schema),
        MetaSchemaRef::Reference(name) => registry.schemas.get(name),
    }
}

fn integer_range(format: Option<&str>) -> Option<(i128, i128)> {
    Some(match format? {
        "int8" => (i8::MIN.into(), i8::MAX.into()),
        "int16" => (i16::MIN.into(), i16::MAX.into()),
        "int32" => (i32::MIN.into(), i32::MAX.into()),
        "int64" => (i64::MIN.into(), i64::MAX.into()),
        "uint8" => (0, u8::MAX.into()),
        "uint16" => (0, u16::MAX.into()),
        "uint32" => (0, u32::MAX.into()),
        "uint64" => (0, u64::MAX.into()),
        _ => return None,
    })
}

fn expected(schema: &MetaSchema) -> String {
    match (schema.ty, schema.format) {
        ("integer", Some(format)) => format!("an integer ({format})"),
        ("integer", None) => "an integer".into(),
        ("number", _) => "a number".into(),
        ("string", _) => "a string".into(),
        ("boolean", _) => "a boolean".into(),
        ("array", _) => "an array".into(),
        ("object", _) => "an object".into(),
        (other, _) => format!("of type {other}"),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn push_segment(pointer: &mut String, name: &str) {
    pointer.push('/');
    for c in name.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

fn child(pointer: &str, name: &str) -> String {
    let mut out = pointer.to_owned();
    push_segment(&mut out, name);
    out
}

/// The fields poem-openapi names in a parse message (`field `x` verification failed.
/// maxLength(3)`, `unknown field `x`.`), as body violations.
pub fn violations_in_message(message: &str) -> Vec<FieldViolation> {
    const MARKER: &str = "field `";
    let mut out: Vec<FieldViolation> = Vec::new();
    let mut offset = 0;
    while let Some(found) = message[offset..].find(MARKER) {
        let start = offset + found;
        let after = &message[start + MARKER.len()..];
        let Some(end) = after.find('`') else { break };
        let field = child("", &after[..end]);
        let text = if message[..start].ends_with("unknown ") {
            String::from("is not a known field")
        } else {
            after[end + 1..]
                .split(" (occurred while")
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if !out.iter().any(|v| v.field == field) {
            out.push(FieldViolation::new("body", field, text));
        }
        offset = start + MARKER.len() + end;
    }
    out
}

#[cfg(test)]
mod tests {
    use poem_openapi::Object;
    use serde_json::json;

    use super::*;

    #[derive(Debug, Object)]
    struct Inner {
        #[oai(validator(max_length = 3))]
        code: String,
    }

    #[derive(Debug, Object)]
    struct Outer {
        name: String,
        count: u8,
        #[oai(validator(maximum(value = "10")))]
        score: f64,
        tags: Option<Vec<String>>,
        inner: Inner,
        items: Vec<Inner>,
    }

    fn fields(value: Value) -> Vec<(String, String)> {
        check_against::<Outer>(&value)
            .into_iter()
            .map(|v| (v.field, v.message))
            .collect()
    }

    #[derive(Debug, Object)]
    struct Stamped {
        #[oai(validator(pattern = "^[a-z]+$"))]
        word: String,
        at: Option<time::OffsetDateTime>,
    }

    #[derive(Debug, poem_openapi::Union)]
    #[oai(one_of)]
    enum OneOrMany {
        One(Stamped),
        Many(Vec<Stamped>),
    }

    #[test]
    fn patterns_and_date_times_are_checked_and_a_union_reports_its_matching_shape() {
        let found: Vec<(String, String)> = check_against::<OneOrMany>(&json!([
            {"word": "fine", "at": "2026-11-24T10:00:00+01:00"},
            {"word": "Not Fine", "at": "yesterday"}
        ]))
        .into_iter()
        .map(|v| (v.field, v.message))
        .collect();
        let pointers: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(pointers, ["/1/word", "/1/at"], "{found:?}");
        assert!(found[0].1.contains("pattern"), "{found:?}");
        assert!(found[1].1.contains("RFC 3339"), "{found:?}");
        let nulls = check_against::<Outer>(&json!({
            "name": "a", "count": 1, "score": 1.0, "inner": null, "items": [], "tags": null
        }));
        let pointers: Vec<&str> = nulls.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(pointers, ["/inner", "/tags"], "{nulls:?}");
        let single = check_against::<OneOrMany>(&json!({"word": "x", "extra": 1}));
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].field, "/extra");
        let neither = check_against::<OneOrMany>(&json!("text"));
        assert_eq!(neither[0].message, "matches none of the allowed shapes");
    }

    struct Word;
    impl StringRule for Word {
        const PATTERN: &'static str = "^[a-z]+$";
        const MAX_CHARS: usize = 5;
    }

    #[test]
    fn matching_strings_are_documented_and_checked() {
        let MetaSchemaRef::Inline(schema) = Matching::<Word>::schema_ref() else {
            panic!("inline");
        };
        assert_eq!(schema.pattern.as_deref(), Some("^[a-z]+$"));
        assert_eq!(schema.max_length, Some(5));
        let ok = Matching::<Word>::parse_from_json(Some(json!("abc"))).expect("matches");
        assert_eq!(ok.into_inner(), "abc");
        for bad in [json!("ABC"), json!("abcdef"), json!(5)] {
            assert!(Matching::<Word>::parse_from_json(Some(bad)).is_err());
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let found = fields(json!({
            "name": "a", "count": 3, "score": 1.0, "inner": {"code": "a", "extra": 1},
            "items": [], "nmae": "typo"
        }));
        let pointers: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(pointers, ["/nmae", "/inner/extra"], "{found:?}");
    }

    #[test]
    fn valid_value_has_no_violations() {
        let ok =
            json!({"name": "a", "count": 3, "score": 1.5, "inner": {"code": "abc"}, "items": []});
        assert!(fields(ok).is_empty());
    }

    #[test]
    fn every_offending_field_is_named_with_a_pointer() {
        let bad = json!({
            "name": 5,
            "count": 300,
            "score": 11,
            "tags": ["x", 1],
            "inner": {},
            "items": [{"code": "toolong"}]
        });
        let found = fields(bad);
        let pointers: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            pointers,
            [
                "/name",
                "/count",
                "/score",
                "/tags/1",
                "/inner/code",
                "/items/0/code"
            ],
            "{found:?}"
        );
        assert_eq!(found[0].1, "must be a string, not a number");
        assert_eq!(found[4].1, "is required");
    }

    #[test]
    fn missing_fields_and_wrong_root_are_reported() {
        let found = fields(json!({"name": "a"}));
        let pointers: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(pointers, ["/count", "/score", "/inner", "/items"]);
        assert_eq!(
            fields(json!([1]))[0],
            (String::new(), "must be an object, not an array".into())
        );
        assert_eq!(
            check_against::<Outer>(&Value::Null)[0].message,
            "a JSON body is required"
        );
    }

    #[test]
    fn pointer_segments_are_escaped() {
        assert_eq!(child("/a", "b/c~d"), "/a/b~1c~0d");
    }

    #[test]
    fn poem_messages_name_their_fields() {
        let v = violations_in_message(
            r#"failed to parse "CreateUser": field `name` verification failed. maxLength(3)"#,
        );
        assert_eq!(
            v,
            vec![FieldViolation::new(
                "body",
                "/name",
                "verification failed. maxLength(3)"
            )]
        );
        let v = violations_in_message(r#"failed to parse "CreateUser": unknown field `nmae`."#);
        assert_eq!(
            v,
            vec![FieldViolation::new("body", "/nmae", "is not a known field")]
        );
        assert!(violations_in_message("expected value at line 1 column 1").is_empty());
    }
}
