//! The `compact` log line: `2026-11-24T06:30:00.123456Z  INFO target: message key=value …`,
//! then the fields of the spans the event happened in, outermost first.
//!
//! tracing-subscriber's own compact formatter styles every field name through
//! `nu_ansi_term` even with colours off, formats the timestamp field by field and floats
//! through `Display`: a third of the CPU of a `/healthz` request went into the access line
//! (tests/bench/RESULTS.md). This one writes the same information with plain string
//! pushes and formats the date part of the timestamp once per second.
//!
//! A string value is written bare only when it cannot be mistaken for structure (no
//! spaces, quotes, `=`, backslashes or control characters); otherwise it is quoted and
//! escaped, so a value supplied by a client cannot forge a field or a line.

use std::{
    cell::RefCell,
    fmt::{self, Write as _},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, format::Writer},
    registry::LookupSpan,
};

/// Formats events as described in the module documentation.
#[derive(Debug, Default, Clone, Copy)]
pub struct LineFormat;

/// Formats fields as `key=value` pairs separated by spaces; `message` is written bare.
#[derive(Debug, Default, Clone, Copy)]
pub struct LineFields;

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write_timestamp(&mut writer)?;
        let meta = event.metadata();
        writer.write_str(level_label(*meta.level()))?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = FieldWriter::new(&mut writer);
        event.record(&mut fields);
        fields.result?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    writer.write_char(' ')?;
                    writer.write_str(fields)?;
                }
            }
        }
        writer.write_char('\n')
    }
}

impl<'w> FormatFields<'w> for LineFields {
    /// A span's fields are written to its text in one piece, so that the text is
    /// allocated once rather than grown field by field.
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        FIELDS.with_borrow_mut(|text| {
            text.clear();
            let mut visitor = FieldWriter::new(text);
            fields.record(&mut visitor);
            visitor.result?;
            writer.write_str(text)
        })
    }
}

fn level_label(level: Level) -> &'static str {
    match level {
        Level::ERROR => " ERROR ",
        Level::WARN => "  WARN ",
        Level::INFO => "  INFO ",
        Level::DEBUG => " DEBUG ",
        Level::TRACE => " TRACE ",
    }
}

thread_local! {
    /// Where a span's fields are formatted before they are written to its text.
    static FIELDS: RefCell<String> = const { RefCell::new(String::new()) };
    /// The second last formatted on this thread, and its text up to the decimal point.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// UTC, RFC 3339 with microseconds.
fn write_timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, micros) = (now.as_secs(), now.subsec_micros());
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            cached.1 = format_second(secs);
            cached.0 = secs;
        }
        writer.write_str(&cached.1)
    })?;
    write!(writer, "{micros:06}Z")
}

fn format_second(secs: u64) -> String {
    let at = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// Whether `value` can be written without quotes. Every byte is checked rather than
/// stopping at the first that needs them: the values are short and nearly always bare,
/// and a loop without an exit is one the compiler turns into vector instructions.
fn is_bare(value: &str) -> bool {
    !value.is_empty()
        && value.bytes().fold(true, |bare, b| {
            bare & b.is_ascii_graphic() & (b != b'"') & (b != b'\\') & (b != b'=')
        })
}

/// Writes fields to `W`: the event's line, or a span's text (a `String`, written
/// without dynamic calls).
struct FieldWriter<'a, W> {
    out: &'a mut W,
    first: bool,
    result: fmt::Result,
}

impl<'a, W: fmt::Write> FieldWriter<'a, W> {
    fn new(out: &'a mut W) -> Self {
        Self {
            out,
            first: true,
            result: Ok(()),
        }
    }

    /// Writes the separator and `name=` (nothing but the separator for `message`).
    fn key(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.out.write_char(' ')?;
        }
        if field.name() != "message" {
            self.out.write_str(field.name())?;
            self.out.write_char('=')?;
        }
        Ok(())
    }

    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.out));
        }
    }
}

/// Passes text through with control characters escaped (`\n`, `\r`, `\u{1b}`, ...), so a
/// message that quotes client text stays on its line and cannot drive a terminal.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.find(char::is_control) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(self.0, "{}", c.escape_debug())?;
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

thread_local! {
    /// Where a `Debug` or `Display` value is formatted before it is known whether it
    /// needs quotes.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<W: fmt::Write> FieldWriter<'_, W> {
    /// A value: bare when plain, otherwise quoted and escaped; a message is never quoted,
    /// but its control characters are escaped.
    fn value(&mut self, field: &Field, value: &str) {
        let message = field.name() == "message";
        let bare = is_bare(value);
        self.field(field, |out| {
            if message {
                Escaped(out).write_str(value)
            } else if bare {
                out.write_str(value)
            } else {
                write!(out, "{value:?}")
            }
        });
    }
}

impl<W: fmt::Write> Visit for FieldWriter<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.value(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            // The common case, a literal or formatted message: written straight through.
            self.field(field, |out| write!(Escaped(out), "{value:?}"));
            return;
        }
        SCRATCH.with_borrow_mut(|text| {
            text.clear();
            if write!(text, "{value:?}").is_ok() {
                self.value(field, text);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_values_go_unquoted() {
        for bare in ["GET", "/api/v1/users/{id}", "abc-123_DEF.4:5", "a@b.c"] {
            assert!(is_bare(bare), "{bare}");
        }
        for quoted in [
            "",
            "two words",
            "a=b",
            "say \"hi\"",
            "line\nbreak",
            "tab\t",
            "é",
        ] {
            assert!(!is_bare(quoted), "{quoted:?}");
        }
        // Long values are checked in blocks: a character needing quotes is found anywhere.
        let long = "0123456789abcdef".repeat(5);
        assert!(is_bare(&long));
        for at in [0, 31, 32, 40, 79] {
            let mut quoted = long.clone().into_bytes();
            quoted[at] = b'=';
            let quoted = String::from_utf8(quoted).expect("ascii");
            assert!(!is_bare(&quoted), "{quoted}");
        }
    }

    #[test]
    fn seconds_are_utc_rfc3339() {
        assert_eq!(format_second(0), "1970-01-01T00:00:00.");
        assert_eq!(format_second(1_795_500_000), "2026-11-24T06:00:00.");
    }

    use std::sync::{Arc, Mutex};
    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt as _};

    /// What a subscriber wrote.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
        }
    }

    fn compact(buffer: &Buffer) -> impl Subscriber + Send + Sync {
        tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(buffer.clone())
                .event_format(LineFormat)
                .fmt_fields(LineFields),
        )
    }

    #[test]
    fn lines_carry_fields_and_span_fields_with_hostile_values_quoted() {
        let buffer = Buffer::default();
        let subscriber = compact(&buffer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = "r-1", path = "/a b");
            let _entered = span.enter();
            tracing::info!(
                target: "trellis::access",
                status = 200u16,
                ok = true,
                who = "x\n  INFO forged: line",
                "request"
            );
        });
        let text = buffer.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        let (timestamp, rest) = text.split_once(' ').expect("timestamp");
        assert_eq!(
            timestamp.len(),
            "2026-11-24T06:00:00.000000Z".len(),
            "{text}"
        );
        assert!(timestamp.ends_with('Z'));
        assert_eq!(
            rest,
            " INFO trellis::access: request status=200 ok=true \
             who=\"x\\n  INFO forged: line\" request_id=r-1 path=\"/a b\"\n"
        );
    }

    #[test]
    fn span_fields_recorded_later_are_written_after_the_others() {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(compact(&buffer), || {
            let span = tracing::info_span!(
                "request",
                request_id = "r-1",
                odd = ?("a", 1),
                trace_id = tracing::field::Empty
            );
            span.record("trace_id", "0af7651916cd43dd8448eb211c80319c");
            let _entered = span.enter();
            tracing::info!("inside");
        });
        let text = buffer.text();
        assert!(
            text.trim_end().ends_with(
                r#": inside request_id=r-1 odd="(\"a\", 1)" trace_id=0af7651916cd43dd8448eb211c80319c"#
            ),
            "{text}"
        );
    }

    /// Client text as a request path (a span field), a user agent (a string field), an
    /// e-mail shown with `%` and inside the message.
    fn emit_hostile_request() {
        let hostile = "evil\r\n2026-01-01T00:00:00Z  INFO trellis::access: forged=\"1\" \u{1b}[2J";
        let span = tracing::info_span!("request", request_id = "r-1", path = hostile);
        let _entered = span.enter();
        let email = format!("{hostile}@example.com");
        tracing::warn!(
            target: "trellis::access",
            user_agent = hostile,
            email = %email,
            "login failed for {email}"
        );
    }

    #[test]
    fn log_lines_cannot_be_forged() {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(compact(&buffer), emit_hostile_request);
        let text = buffer.text();
        assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
        assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");
        let line = text.trim_end();
        // Every field holding the hostile text is one quoted value; the message keeps its
        // words but not its control characters.
        assert_eq!(line.matches("forged=").count(), 4, "{line}");
        for key in ["user_agent=", "email=", "path="] {
            let at = line.find(key).expect(key) + key.len();
            assert!(
                line[at..].starts_with("\"evil\\r\\n"),
                "{key} is quoted: {line}"
            );
        }
        assert!(line.contains("login failed for evil\\r\\n"), "{line}");

        let buffer = Buffer::default();
        let json = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(buffer.clone())
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false),
        );
        tracing::subscriber::with_default(json, emit_hostile_request);
        let text = buffer.text();
        assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
        assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");
        let event: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
        assert!(
            event["user_agent"]
                .as_str()
                .is_some_and(|v| v.contains("\r\n"))
        );
        assert!(
            event["span"]["path"]
                .as_str()
                .is_some_and(|v| v.contains('\u{1b}'))
        );
    }
}
