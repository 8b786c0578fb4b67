//! A tracing layer that records spans and events, to assert on what the guard emits.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// One recorded span: its name, parent's name and final field values.
#[derive(Clone, Debug, Default)]
pub struct SpanRecord {
    pub name: String,
    pub parent: Option<String>,
    pub fields: BTreeMap<String, String>,
}

impl SpanRecord {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// One recorded event: level, message and fields.
#[derive(Clone, Debug, Default)]
pub struct EventRecord {
    pub level: String,
    pub parent: Option<String>,
    pub fields: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
pub struct Recorder {
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    events: Arc<Mutex<Vec<EventRecord>>>,
}

impl Recorder {
    /// Installs the recorder as the default subscriber for this thread until the
    /// guard drops. Use it in current-thread tokio tests.
    ///
    /// Tests that record spans run one at a time: tracing caches per-callsite
    /// interest process-wide, and scoped subscribers coming and going on other
    /// threads could otherwise hide a span from this one.
    pub fn install(&self) -> Installed {
        static SERIAL: Mutex<()> = Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let subscriber = tracing_subscriber::registry().with(self.clone());
        let default = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        Installed {
            _default: default,
            _serial: serial,
        }
    }

    pub fn spans(&self) -> Vec<SpanRecord> {
        self.spans.lock().unwrap().clone()
    }

    pub fn spans_named(&self, name: &str) -> Vec<SpanRecord> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    pub fn events(&self) -> Vec<EventRecord> {
        self.events.lock().unwrap().clone()
    }
}

/// Keeps the recorder installed (and other recording tests waiting).
pub struct Installed {
    _default: tracing::subscriber::DefaultGuard,
    _serial: std::sync::MutexGuard<'static, ()>,
}

struct Index(usize);

struct FieldVisitor<'a>(&'a mut BTreeMap<String, String>);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S> Layer<S> for Recorder
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut record = SpanRecord {
            name: attrs.metadata().name().to_string(),
            ..Default::default()
        };
        attrs.record(&mut FieldVisitor(&mut record.fields));
        if let Some(span) = ctx.span(id) {
            record.parent = span.parent().map(|p| p.name().to_string());
            let mut spans = self.spans.lock().unwrap();
            span.extensions_mut().insert(Index(spans.len()));
            spans.push(record);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(Index(i)) = span.extensions().get::<Index>() {
                let mut spans = self.spans.lock().unwrap();
                values.record(&mut FieldVisitor(&mut spans[*i].fields));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut record = EventRecord {
            level: event.metadata().level().to_string(),
            parent: ctx.event_span(event).map(|s| s.name().to_string()),
            ..Default::default()
        };
        event.record(&mut FieldVisitor(&mut record.fields));
        self.events.lock().unwrap().push(record);
    }
}
