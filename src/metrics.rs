//! The opt-in Prometheus endpoint (`metrics.address`): pool data and metadata used and total,
//! snapshots by kind, per-call latency histograms and error counts by gRPC status code.
//!
//! Calls are recorded always (a histogram observation is a few atomic adds); the pool gauges
//! are read from the engine when `/metrics` is scraped. Nothing here changes state.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use tracing::{info, warn};

use crate::engine::Engine;

struct Metrics {
    registry: Registry,
    latency: HistogramVec,
    errors: IntCounterVec,
    space: GaugeVec,
    snapshots: GaugeVec,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let registry = Registry::new_custom(Some("thinsnap".into()), None)
            .expect("a static prefix is a valid registry");
        let latency = HistogramVec::new(
            HistogramOpts::new("call_duration_seconds", "Latency of Snapshots API calls").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            &["method"],
        )
        .expect("static metric definition");
        let errors = IntCounterVec::new(
            Opts::new(
                "call_errors_total",
                "Failed Snapshots API calls by gRPC status code",
            ),
            &["method", "code"],
        )
        .expect("static metric definition");
        let space = GaugeVec::new(
            Opts::new("pool_bytes", "Thin pool space in bytes"),
            &["space", "state"],
        )
        .expect("static metric definition");
        let snapshots = GaugeVec::new(Opts::new("snapshots", "Snapshots by kind"), &["kind"])
            .expect("static metric definition");
        for c in [
            Box::new(latency.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(space.clone()),
            Box::new(snapshots.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            latency,
            errors,
            space,
            snapshots,
        }
    })
}

/// Records one call of `method` that started at `start`, failed with `code` if any.
pub fn observe(method: &str, start: Instant, code: Option<tonic::Code>) {
    let m = metrics();
    m.latency
        .with_label_values(&[method])
        .observe(start.elapsed().as_secs_f64());
    if let Some(code) = code {
        m.errors
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
    }
}

/// The text exposition of every metric, after refreshing the pool gauges from `engine`.
pub async fn render(engine: &Engine) -> String {
    let m = metrics();
    match engine.status().await {
        Ok(st) => {
            let p = &st.pool;
            for (space, used, total) in [
                ("data", p.data_used_bytes, p.data_total_bytes),
                ("metadata", p.metadata_used_bytes, p.metadata_total_bytes),
            ] {
                m.space.with_label_values(&[space, "used"]).set(used as f64);
                m.space
                    .with_label_values(&[space, "total"])
                    .set(total as f64);
            }
            m.snapshots
                .with_label_values(&["active"])
                .set(st.active as f64);
            m.snapshots
                .with_label_values(&["view"])
                .set(st.views as f64);
            m.snapshots
                .with_label_values(&["committed"])
                .set(st.committed as f64);
        }
        Err(e) => warn!(error = %e, "cannot read pool status for metrics"),
    }
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&m.registry.gather(), &mut buf)
        .expect("text encoding into a Vec cannot fail");
    String::from_utf8(buf).expect("the text format is UTF-8")
}

/// Serves `GET /metrics` on `addr` until `shutdown` completes.
///
/// Returns an error if the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    engine: Arc<Engine>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), hyper::Error> {
    use hyper::service::{make_service_fn, service_fn};
    use hyper::{Body, Response, StatusCode};
    let make = make_service_fn(move |_| {
        let engine = engine.clone();
        async move {
            Ok::<_, std::convert::Infallible>(service_fn(move |req| {
                let engine = engine.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Body::from(render(&engine).await))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Body::from("see /metrics\n"))
                    };
                    Ok::<_, std::convert::Infallible>(
                        resp.expect("static response parts are valid"),
                    )
                }
            }))
        }
    });
    let server = hyper::Server::try_bind(&addr)?.serve(make);
    info!(address = %addr, "serving metrics");
    server.with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_errors_are_counted() {
        observe("prepare", Instant::now(), None);
        observe("prepare", Instant::now(), Some(tonic::Code::AlreadyExists));
        let text = {
            let mut buf = Vec::new();
            TextEncoder::new()
                .encode(&metrics().registry.gather(), &mut buf)
                .expect("encode");
            String::from_utf8(buf).expect("utf8")
        };
        assert!(
            text.contains("thinsnap_call_duration_seconds_count{method=\"prepare\"}"),
            "{text}"
        );
        assert!(
            text.contains(
                "thinsnap_call_errors_total{code=\"AlreadyExists\",method=\"prepare\"} 1"
            ),
            "{text}"
        );
    }
}
