//! The Prometheus recorder (SPEC §10).
//!
//! The `metrics` facade has one global recorder per process, so it is installed once and every
//! `Application` in the process (tests start many) renders the same registry.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from sub-millisecond to the request timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's recorder handle, installing the recorder on first use.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_duration_seconds".into()),
                    LATENCY_BUCKETS,
                )
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, which this crate never does.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Drains histogram samples into their buckets every few seconds, so memory stays flat when
/// nothing scrapes `/metrics`. Stops with `shutdown`.
pub fn spawn_upkeep(
    handle: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    })
}

fn describe() {
    metrics::describe_counter!("queue_published_total", "Messages published, by queue.");
    metrics::describe_counter!(
        "queue_consumed_total",
        "Deliveries settled, by queue and outcome (ack, nack, dead, lease_lost)."
    );
    metrics::describe_gauge!("queue_depth", "Messages per queue: pending or dead.");
    metrics::describe_counter!(
        "cache_errors_total",
        "Cache calls that found the cache unreachable."
    );
    metrics::describe_counter!(
        "http_requests_total",
        "HTTP requests served, by method, matched route and status."
    );
    metrics::describe_histogram!(
        "http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from request to response headers, by method and matched route."
    );
}
