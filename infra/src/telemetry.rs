//! Metrics: the names every gochat service records under, and the one Prometheus recorder of a
//! process.
//!
//! Services record through the `metrics` facade (`metrics::counter!`, `gauge!`, `histogram!`),
//! always with the names below and with `&'static str` label values, so a per-message call
//! allocates no label string. Until [`install`] runs, the facade's calls are no-ops (unit tests
//! of a single crate record nothing). [`install`] puts a Prometheus recorder in place once per
//! process and returns its handle; the gateway renders it at `GET /metrics`, on the same
//! listener as the API (there is no separate metrics listener). Whoever installs it also calls
//! [`PrometheusHandle::run_upkeep`] every few seconds (the `serve` sampler and every distributed
//! process do, once a second), so histogram
//! samples recorded between two scrapes are folded into their buckets instead of piling up.
//!
//! Conventions: every name starts with `gochat_`; counters end in `_total`, durations are in
//! seconds and end in `_seconds`; label `kind` names an actor kind ([`KIND_SESSION`],
//! [`KIND_CONVERSATION`], [`KIND_FANOUT`]), `code` a spec error code ([`code_label`]), `op` a
//! store or cache operation. Every metric is listed with its meaning in `docs/operations.md`.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

pub use metrics_exporter_prometheus::PrometheusHandle;

use crate::ErrorCode;

// ---- actors (label `kind`) ----

/// Gauge: live actors, by `kind`.
pub const ACTORS: &str = "gochat_actors";
/// Histogram: how many items wait in an actor's queue, sampled when it takes work, by `kind`.
pub const MAILBOX_DEPTH: &str = "gochat_actor_mailbox_depth";
/// Histogram: seconds an actor spends on one unit of work (a frame, a batch, a job), by `kind`.
pub const HANDLING_SECONDS: &str = "gochat_actor_handling_seconds";
/// Histogram: items in one batch (messages per conversation batch, recipients per fan-out
/// record, conversation batches per SQLite group commit), by `kind`.
pub const BATCH_SIZE: &str = "gochat_batch_size";

/// `kind` of the gateway's Session actors.
pub const KIND_SESSION: &str = "session";
/// `kind` of logic's Conversation actors.
pub const KIND_CONVERSATION: &str = "conversation";
/// `kind` of the task service's Fanout actors.
pub const KIND_FANOUT: &str = "fanout";

// ---- gateway ----

/// Gauge: open WebSocket connections.
pub const GATEWAY_CONNECTIONS: &str = "gochat_gateway_connections";
/// Counter: WebSocket connections accepted.
pub const GATEWAY_CONNECTS: &str = "gochat_gateway_connects_total";
/// Counter: WebSocket connections ended, by `cause`.
pub const GATEWAY_DISCONNECTS: &str = "gochat_gateway_disconnects_total";
/// Gauge: users with local sessions, by `sessions` ("1", "2", "3", "4+").
pub const GATEWAY_USERS: &str = "gochat_gateway_users";
/// Counter: WebSocket frames received, by `type`.
pub const GATEWAY_FRAMES_IN: &str = "gochat_gateway_frames_in_total";
/// Counter: WebSocket frames written, by `type`.
pub const GATEWAY_FRAMES_OUT: &str = "gochat_gateway_frames_out_total";
/// Counter: `send-message` frames published to `im-upstream-topic`.
pub const GATEWAY_MESSAGES_IN: &str = "gochat_gateway_messages_in_total";
/// Counter: `new-message` frames written to clients.
pub const GATEWAY_MESSAGES_OUT: &str = "gochat_gateway_messages_out_total";
/// Counter: downstream records consumed.
pub const GATEWAY_DOWNSTREAM_RECORDS: &str = "gochat_gateway_downstream_records_total";
/// Counter: downstream records that did not parse.
pub const GATEWAY_DOWNSTREAM_MALFORMED: &str = "gochat_gateway_downstream_malformed_total";
/// Counter: `new-message` deliveries dropped as already delivered to the session.
pub const GATEWAY_DUPLICATES_DROPPED: &str = "gochat_gateway_duplicates_dropped_total";
/// Counter: frames a connection dropped while its `101` was held for the presence report, once
/// it held `outbound_queue` frames already (its resync after opening finds the messages).
pub const GATEWAY_HELD_DROPPED: &str = "gochat_gateway_held_dropped_total";
/// Counter: errors answered to clients, by `code` and `transport` ("ws" error frames, "http"
/// error responses).
pub const GATEWAY_ERRORS: &str = "gochat_gateway_errors_total";
/// Histogram: how long WebSocket upgrades waited for their user's presence report.
pub const GATEWAY_PRESENCE_WAIT: &str = "gochat_gateway_presence_wait_seconds";
/// Counter: upgrades answered without their presence report (it took over `presence_wait`).
pub const GATEWAY_PRESENCE_LATE: &str = "gochat_gateway_presence_late_total";
/// Histogram: HTTP request duration, by `status` class ("2xx", "4xx", ...).
pub const HTTP_REQUEST_SECONDS: &str = "gochat_http_request_duration_seconds";

// ---- logic ----

/// Counter: messages stored by Conversation actors.
pub const LOGIC_MESSAGES_STORED: &str = "gochat_logic_messages_stored_total";
/// Counter: sends recognised as retries (same sender and `client_msg_id`) and answered with the
/// original ack.
pub const LOGIC_MESSAGES_DUPLICATE: &str = "gochat_logic_messages_duplicate_total";
/// Counter: sends refused with an error frame, by `code`.
pub const LOGIC_MESSAGES_REFUSED: &str = "gochat_logic_messages_refused_total";

// ---- task ----

/// Counter: task records read from `im-task-topic`.
pub const TASK_RECORDS: &str = "gochat_task_records_total";
/// Counter: task records committed without being carried out, by `reason` ("malformed",
/// "unhandled", "rejected").
pub const TASK_DROPPED: &str = "gochat_task_records_dropped_total";
/// Counter: Fan-out job runs, by `result` ("done", "failed").
pub const FANOUT_JOBS: &str = "gochat_fanout_jobs_total";
/// Counter: downstream records produced by Fan-out jobs (broadcasts included).
pub const FANOUT_RECORDS: &str = "gochat_fanout_records_total";
/// Counter: world-room broadcast records produced.
pub const FANOUT_BROADCASTS: &str = "gochat_fanout_broadcasts_total";
/// Counter: recipients named in fan-out records.
pub const FANOUT_DELIVERIES: &str = "gochat_fanout_deliveries_total";
/// Counter: repo calls and downstream sends of the task service that were retried.
pub const TASK_RETRIES: &str = "gochat_task_retries_total";

// ---- bus ----

/// Gauge: records of `topic` not yet committed by consumer `group`.
pub const BUS_LAG: &str = "gochat_bus_consumer_lag";

// ---- repo (label `op`) ----

/// Histogram: seconds per store (database) call, by `op`.
pub const STORE_SECONDS: &str = "gochat_store_duration_seconds";
/// Counter: failed store calls, by `op`.
pub const STORE_ERRORS: &str = "gochat_store_errors_total";
/// Counter: SQLite group commits, by `how` (`fresh`: every batch with one set of statements and
/// no lookup, none of their messages stored before; `merged`: the same after looking up what
/// was stored, after a collision and for a few groups after one; `one_by_one`: batches that
/// collided; `failed`).
pub const STORE_GROUP_COMMITS: &str = "gochat_store_group_commits_total";
/// Histogram: seconds per cache call, by `op`.
pub const CACHE_SECONDS: &str = "gochat_cache_duration_seconds";
/// Counter: failed cache calls, by `op`.
pub const CACHE_ERRORS: &str = "gochat_cache_errors_total";

// ---- process ----

/// Gauge: Unix time (seconds) at which metrics were installed in this process.
pub const START_TIME_SECONDS: &str = "gochat_start_time_seconds";

/// Buckets of every `*_seconds` histogram: 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Buckets of [`BATCH_SIZE`]: powers of two up to 1024 (a conversation batch is at most
/// `max_batch`, 256 by default; a fan-out page 200).
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Buckets of [`MAILBOX_DEPTH`]: empty, then powers of two up to 4096 (mailboxes hold 1024 and
/// outbound queues 256 by default).
pub const DEPTH_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The builder with gochat's histogram buckets.
fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(MAILBOX_DEPTH.into()), DEPTH_BUCKETS)
}

/// Installs the process's Prometheus recorder (the first call) and returns its handle; later
/// calls return the same handle, so several servers in one process (tests) share one recorder.
/// If some other recorder was installed first, gochat's metrics go there and the returned
/// handle renders only what it holds (nothing); this is logged.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = builder().unwrap_or_else(|e| {
                tracing::warn!(cause = %e, "metric buckets refused; histograms become summaries");
                PrometheusBuilder::new()
            });
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or_default();
                    metrics::gauge!(START_TIME_SECONDS).set(now);
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "another metrics recorder is installed; /metrics stays empty");
                }
            }
            handle
        })
        .clone()
}

/// The `code` label of an error code: its number as text, without allocating.
pub const fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Internal => "1000",
        ErrorCode::InvalidParameter => "1001",
        ErrorCode::Unauthorized => "1002",
        ErrorCode::Forbidden => "1003",
        ErrorCode::NotFound => "1004",
        ErrorCode::RateLimited => "1005",
        ErrorCode::Unavailable => "1006",
        ErrorCode::UserNotFound => "2000",
        ErrorCode::UserExists => "2001",
        ErrorCode::InvalidPassword => "2002",
        ErrorCode::MessageNotFound => "3000",
        ErrorCode::DuplicateMessage => "3001",
        ErrorCode::InvalidMessage => "3002",
        ErrorCode::SeqConflict => "3003",
        ErrorCode::GroupNotFound => "4000",
        ErrorCode::NotGroupMember => "4001",
        ErrorCode::GroupFull => "4002",
    }
}

/// The `status` label of an HTTP status code: its class.
pub const fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// `HELP` lines and units of every metric.
fn describe() {
    describe_gauge!(
        ACTORS,
        "Live actors, by kind (session, conversation, fanout)."
    );
    describe_histogram!(
        MAILBOX_DEPTH,
        "Items waiting in an actor's queue when it takes work, by kind."
    );
    describe_histogram!(
        HANDLING_SECONDS,
        Unit::Seconds,
        "Time an actor spends on one unit of work (session: a frame; conversation: a batch; fanout: a job)."
    );
    describe_histogram!(
        BATCH_SIZE,
        "Items per batch (conversation: messages per batch; fanout: recipients per downstream record)."
    );
    describe_gauge!(GATEWAY_CONNECTIONS, "Open WebSocket connections.");
    describe_counter!(GATEWAY_CONNECTS, "WebSocket connections accepted.");
    describe_counter!(
        GATEWAY_DISCONNECTS,
        "WebSocket connections ended, by cause."
    );
    describe_gauge!(
        GATEWAY_USERS,
        "Users with local WebSocket sessions, by number of sessions (1, 2, 3, 4+)."
    );
    describe_counter!(GATEWAY_FRAMES_IN, "WebSocket frames received, by type.");
    describe_counter!(GATEWAY_FRAMES_OUT, "WebSocket frames written, by type.");
    describe_counter!(
        GATEWAY_MESSAGES_IN,
        "send-message frames published to im-upstream-topic."
    );
    describe_counter!(
        GATEWAY_MESSAGES_OUT,
        "new-message frames written to clients."
    );
    describe_counter!(GATEWAY_DOWNSTREAM_RECORDS, "Downstream records consumed.");
    describe_counter!(
        GATEWAY_DOWNSTREAM_MALFORMED,
        "Downstream records that did not parse."
    );
    describe_counter!(
        GATEWAY_DUPLICATES_DROPPED,
        "new-message deliveries dropped as already delivered to the session."
    );
    describe_counter!(
        GATEWAY_HELD_DROPPED,
        "Frames dropped while a connection's 101 waited for its presence report and it already held outbound_queue frames."
    );
    describe_counter!(
        GATEWAY_ERRORS,
        "Errors answered to clients, by code and transport (ws, http)."
    );
    describe_histogram!(
        GATEWAY_PRESENCE_WAIT,
        Unit::Seconds,
        "Time a WebSocket upgrade waited for its user's presence report before answering 101."
    );
    describe_counter!(
        GATEWAY_PRESENCE_LATE,
        "WebSocket upgrades answered before their presence report (it took over presence_wait)."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP request duration, by status class."
    );
    describe_counter!(LOGIC_MESSAGES_STORED, "Messages stored.");
    describe_counter!(
        LOGIC_MESSAGES_DUPLICATE,
        "Retried sends answered with the original ack."
    );
    describe_counter!(
        LOGIC_MESSAGES_REFUSED,
        "Sends refused with an error frame, by code."
    );
    describe_counter!(TASK_RECORDS, "Task records read from im-task-topic.");
    describe_counter!(
        TASK_DROPPED,
        "Task records committed without being carried out, by reason."
    );
    describe_counter!(FANOUT_JOBS, "Fan-out job runs, by result.");
    describe_counter!(
        FANOUT_RECORDS,
        "Downstream records produced by fan-out jobs."
    );
    describe_counter!(FANOUT_BROADCASTS, "World-room broadcast records produced.");
    describe_counter!(FANOUT_DELIVERIES, "Recipients named in fan-out records.");
    describe_counter!(TASK_RETRIES, "Task-service calls that were retried.");
    describe_gauge!(
        BUS_LAG,
        "Records of a topic not yet committed by a consumer group."
    );
    describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Database call duration, by operation."
    );
    describe_counter!(STORE_ERRORS, "Failed database calls, by operation.");
    describe_counter!(
        STORE_GROUP_COMMITS,
        "SQLite group commits, by how the batches were stored."
    );
    describe_histogram!(
        CACHE_SECONDS,
        Unit::Seconds,
        "Cache call duration, by operation."
    );
    describe_counter!(CACHE_ERRORS, "Failed cache calls, by operation.");
    describe_gauge!(
        START_TIME_SECONDS,
        Unit::Seconds,
        "Unix time at which this process installed its metrics."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buckets_are_accepted() {
        builder().expect("buckets are valid");
        for b in [LATENCY_BUCKETS, BATCH_BUCKETS, DEPTH_BUCKETS] {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?} ascending");
        }
    }

    #[test]
    fn code_labels_are_the_numbers() {
        for code in ErrorCode::ALL {
            assert_eq!(code_label(code), code.as_u16().to_string());
        }
    }

    #[test]
    fn install_is_idempotent_and_renders_with_buckets() {
        let first = install();
        let second = install();
        metrics::counter!("gochat_test_things_total", "kind" => "session").increment(3);
        metrics::histogram!(STORE_SECONDS, "op" => "get_user").record(0.003);
        metrics::histogram!(BATCH_SIZE, "kind" => "conversation").record(5.0);
        second.run_upkeep();
        let text = first.render();
        assert!(
            text.contains("gochat_test_things_total{kind=\"session\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("gochat_store_duration_seconds_bucket{op=\"get_user\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gochat_batch_size_bucket{kind=\"conversation\",le=\"8\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# HELP gochat_store_duration_seconds "),
            "{text}"
        );
        assert!(text.contains("gochat_start_time_seconds"), "{text}");
    }
}
