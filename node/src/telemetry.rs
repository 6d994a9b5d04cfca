//! Logs and traces: a `tracing` subscriber writing text or JSON to stderr, plus OpenTelemetry
//! export over OTLP/gRPC when an endpoint is configured.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::TelemetrySection;

/// Keeps the OTLP pipeline alive; flushes it on drop.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `config.log_filter`. Must run inside a
/// tokio runtime when `otlp_endpoint` is set.
///
/// # Errors
/// A bad filter or an OTLP exporter that cannot be built.
pub fn init(config: &TelemetrySection) -> anyhow::Result<TelemetryGuard> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(value).context("RUST_LOG")?,
        _ => EnvFilter::try_new(&config.log_filter).context("telemetry.log_filter")?,
    };
    let provider = if config.otlp_endpoint.is_empty() {
        None
    } else {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.otlp_endpoint.clone())
            .build()
            .context("telemetry.otlp_endpoint")?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("flotilla")
            .build();
        Some(
            opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    };
    let otel_layer = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("flotilla")));
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let result = if config.log_format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    // A second init (tests, in-process quick start) keeps the first subscriber.
    drop(result);
    Ok(TelemetryGuard { provider })
}
