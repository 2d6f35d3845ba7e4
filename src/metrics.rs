//! The opt-in Prometheus endpoint (`metrics.address`): pool data and metadata used and total,
//! snapshots by kind, per-call latency histograms, error counts by gRPC status code, and the
//! store's durable writes (`thinsnap_store_flushes_total`: one fsync each on a disk).
//!
//! Calls are recorded always (a histogram observation is a few atomic adds); the pool gauges
//! are read from the engine when `/metrics` is scraped, at most once per [`REFRESH_EVERY`]
//! (reading them scans the store, on a blocking thread): a scrape in between, or many at once,
//! gets the gauges as last read. Nothing here changes state. Each server
//! (and each test) has its own [`Metrics`] with its own registry: no count depends on what else
//! ran in the process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use tracing::{info, warn};

use crate::engine::{Engine, EngineHandle};

/// The gauges read from the engine (pool space, snapshots by kind, devices) are at most this old
/// when a scrape shows them: however often `/metrics` is scraped, the store is scanned at most
/// once per interval (Prometheus scrapes every 15 s or more by default).
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The metrics of one server: its registry and the collectors in it.
pub struct Metrics {
    /// When the engine's gauges were last read (None: never); held while they are read, so
    /// concurrent scrapes wait for one read instead of each scanning the store.
    refreshed: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// How many times the engine's gauges were read (for tests).
    refreshes: std::sync::atomic::AtomicU64,
    registry: Registry,
    latency: HistogramVec,
    errors: IntCounterVec,
    space: GaugeVec,
    snapshots: GaugeVec,
    /// The store's flushes since start, brought up to the engine's count at each scrape.
    flushes: IntCounter,
    /// Snapshots whose devices are not live: `awaiting_activation` (lazy activation after a
    /// reboot) and `quarantined`.
    devices: GaugeVec,
    /// Warm spares ready to be taken (`thinsnap_spares_ready`).
    spares_ready: prometheus::Gauge,
    /// Prepares and Views served from a warm spare, brought up to the engine's count at each
    /// scrape (`thinsnap_spares_taken_total`).
    spares_taken: IntCounter,
    /// Prepares and Views that could have used a spare but found none
    /// (`thinsnap_spares_missed_total`).
    spares_missed: IntCounter,
    /// What the last audit of thin ids found (`thinsnap_audit_thin_ids{found="unknown"|"missing"}`)
    /// and the audits run since start (`thinsnap_audit_runs_total`).
    audit: GaugeVec,
    audit_runs: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every collector registered and no observation.
    pub fn new() -> Metrics {
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
        let flushes = IntCounter::new(
            "store_flushes_total",
            "Durable writes of the store (sled flushes, one fsync each on a disk)",
        )
        .expect("static metric definition");
        let devices = GaugeVec::new(
            Opts::new(
                "snapshot_devices",
                "Active snapshots and views whose devices await activation, and quarantined snapshots",
            ),
            &["state"],
        )
        .expect("static metric definition");
        let spares_ready = prometheus::Gauge::new("spares_ready", "Warm spares ready to be taken")
            .expect("static metric definition");
        let spares_taken = IntCounter::new(
            "spares_taken_total",
            "Prepares and Views served from a warm spare",
        )
        .expect("static metric definition");
        let spares_missed = IntCounter::new(
            "spares_missed_total",
            "Prepares and Views that could have used a warm spare but found none",
        )
        .expect("static metric definition");
        let audit = GaugeVec::new(
            Opts::new(
                "audit_thin_ids",
                "Thin ids the last audit found in the pool with no record (unknown, left alone) \
                 and of ready records missing from the pool (missing)",
            ),
            &["found"],
        )
        .expect("static metric definition");
        let audit_runs = IntCounter::new(
            "audit_runs_total",
            "Audits of the pool's thin ids against the store since start",
        )
        .expect("static metric definition");
        for c in [
            Box::new(flushes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(audit.clone()),
            Box::new(audit_runs.clone()),
            Box::new(spares_ready.clone()),
            Box::new(spares_taken.clone()),
            Box::new(spares_missed.clone()),
            Box::new(latency.clone()),
            Box::new(errors.clone()),
            Box::new(space.clone()),
            Box::new(snapshots.clone()),
            Box::new(devices.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            refreshed: tokio::sync::Mutex::new(None),
            refreshes: std::sync::atomic::AtomicU64::new(0),
            registry,
            latency,
            errors,
            space,
            snapshots,
            flushes,
            devices,
            spares_ready,
            spares_taken,
            spares_missed,
            audit,
            audit_runs,
        }
    }

    /// Brings `thinsnap_store_flushes_total` up to `total`, the store's count since start.
    fn set_flushes(&self, total: u64) {
        catch_up(&self.flushes, total);
    }

    /// The warm spares' gauge and counters, from the engine's counts.
    fn set_spares(&self, c: crate::engine::SpareCounts) {
        self.spares_ready.set(c.ready as f64);
        catch_up(&self.spares_taken, c.taken);
        catch_up(&self.spares_missed, c.missed);
    }

    /// Records one call of `method` that started at `start`, failed with `code` if any.
    pub fn observe(&self, method: &str, start: Instant, code: Option<tonic::Code>) {
        let m = self;
        m.latency
            .with_label_values(&[method])
            .observe(start.elapsed().as_secs_f64());
        if let Some(code) = code {
            m.errors
                .with_label_values(&[method, &format!("{code:?}")])
                .inc();
        }
    }

    /// The text exposition of every metric, after refreshing the pool gauges from `engine` if
    /// they are older than [`REFRESH_EVERY`] (none while the daemon starts: the gauges keep
    /// their last values, zero at first).
    pub async fn render(&self, engine: Option<&Engine>) -> String {
        let m = self;
        if let Some(engine) = engine {
            let mut last = m.refreshed.lock().await;
            let now = tokio::time::Instant::now();
            if last.is_none_or(|t| now.duration_since(t) >= REFRESH_EVERY) {
                m.refresh(engine).await;
                m.refreshes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *last = Some(now);
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Refreshes the gauges and the engine's counters from `engine`.
    async fn refresh(&self, engine: &Engine) {
        let m = self;
        m.set_flushes(engine.store_flushes());
        m.set_spares(engine.spare_counts());
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
                m.devices
                    .with_label_values(&["awaiting_activation"])
                    .set(st.inactive as f64);
                m.devices
                    .with_label_values(&["quarantined"])
                    .set(st.quarantined.len() as f64);
                m.audit
                    .with_label_values(&["unknown"])
                    .set(st.audit.unknown.len() as f64);
                m.audit
                    .with_label_values(&["missing"])
                    .set(st.audit.missing.len() as f64);
                catch_up(&m.audit_runs, st.audit.runs);
            }
            Err(e) => warn!(error = %e, "cannot read pool status for metrics"),
        }
    }
}

/// Brings counter `c` up to `total`, a count the engine keeps since start.
fn catch_up(c: &IntCounter, total: u64) {
    let seen = c.get();
    if total > seen {
        c.inc_by(total - seen);
    }
}

/// Binds `addr` and returns the endpoint serving `GET /metrics` until `shutdown` completes.
///
/// Returns an error if the address cannot be bound.
pub fn bind(
    addr: SocketAddr,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<impl std::future::Future<Output = Result<(), hyper::Error>> + Send, hyper::Error> {
    use hyper::service::{make_service_fn, service_fn};
    use hyper::{Body, Response, StatusCode};
    let make = make_service_fn(move |_| {
        let (engine, metrics) = (engine.clone(), metrics.clone());
        async move {
            Ok::<_, std::convert::Infallible>(service_fn(move |req| {
                let (engine, metrics) = (engine.clone(), metrics.clone());
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Body::from(metrics.render(engine.now().as_deref()).await))
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
    Ok(server.with_graceful_shutdown(shutdown))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut buf)
            .expect("encode");
        String::from_utf8(buf).expect("utf8")
    }

    #[test]
    fn calls_and_errors_are_counted() {
        let m = Metrics::new();
        m.observe("prepare", Instant::now(), None);
        m.observe("prepare", Instant::now(), Some(tonic::Code::AlreadyExists));
        let text = text(&m);
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

    #[test]
    fn store_flushes_are_a_counter_that_follows_the_store() {
        let m = Metrics::new();
        m.set_flushes(3);
        m.set_flushes(5);
        m.set_flushes(4);
        let text = text(&m);
        assert!(
            text.contains("# TYPE thinsnap_store_flushes_total counter"),
            "{text}"
        );
        assert!(text.contains("thinsnap_store_flushes_total 5"), "{text}");
    }

    #[test]
    fn spares_have_a_gauge_and_two_counters_under_the_names_benches_read() {
        let m = Metrics::new();
        m.set_spares(crate::engine::SpareCounts {
            ready: 2,
            target: 4,
            taken: 7,
            missed: 1,
            ..Default::default()
        });
        m.set_spares(crate::engine::SpareCounts {
            ready: 1,
            target: 4,
            taken: 9,
            missed: 1,
            ..Default::default()
        });
        let text = text(&m);
        for want in [
            "# TYPE thinsnap_spares_ready gauge",
            "thinsnap_spares_ready 1",
            "# TYPE thinsnap_spares_taken_total counter",
            "thinsnap_spares_taken_total 9",
            "thinsnap_spares_missed_total 1",
        ] {
            assert!(text.contains(want), "{want:?} missing in {text}");
        }
    }

    /// Scrapes read the engine (a scan of the store) at most once per REFRESH_EVERY: a second
    /// scrape at once shows the gauges as last read, one after the interval reads them again.
    #[tokio::test(start_paused = true)]
    async fn scrapes_read_the_store_at_most_once_per_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (engine, _) = crate::engine::recovery::start(
            Arc::new(crate::pool::fake::FakePool::new()),
            crate::store::Store::open(&dir.path().join("db")).expect("store"),
            crate::engine::Settings::with_fs(crate::config::FsConfig::default()),
            &|_: &std::path::Path| Ok(()),
        )
        .expect("engine");
        let m = Metrics::new();
        let refreshes = || m.refreshes.load(std::sync::atomic::Ordering::Relaxed);
        let text = m.render(Some(&engine)).await;
        assert!(
            text.contains("thinsnap_snapshots{kind=\"active\"} 0"),
            "{text}"
        );
        assert_eq!(refreshes(), 1);
        engine
            .create(crate::engine::Kind::Active, "a", "", Default::default())
            .await
            .expect("a");
        for _ in 0..3 {
            let text = m.render(Some(&engine)).await;
            assert!(
                text.contains("thinsnap_snapshots{kind=\"active\"} 0"),
                "{text}"
            );
        }
        assert_eq!(
            refreshes(),
            1,
            "scrapes within the interval read the store again"
        );
        tokio::time::advance(REFRESH_EVERY).await;
        let text = m.render(Some(&engine)).await;
        assert!(
            text.contains("thinsnap_snapshots{kind=\"active\"} 1"),
            "{text}"
        );
        assert_eq!(refreshes(), 2);
    }

    #[test]
    fn each_registry_counts_only_its_own_calls() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.observe("remove", Instant::now(), Some(tonic::Code::NotFound));
        a.observe("remove", Instant::now(), Some(tonic::Code::NotFound));
        b.observe("remove", Instant::now(), Some(tonic::Code::NotFound));
        assert!(
            text(&a).contains("thinsnap_call_errors_total{code=\"NotFound\",method=\"remove\"} 2"),
            "{}",
            text(&a)
        );
        assert!(
            text(&b).contains("thinsnap_call_errors_total{code=\"NotFound\",method=\"remove\"} 1"),
            "{}",
            text(&b)
        );
    }
}
