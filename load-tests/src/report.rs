//! Results: HDR latency histograms (recorded in microseconds, shared by many connection tasks
//! through a few locked shards), their summaries in milliseconds, the V2 + base64 form in which
//! storm workers hand theirs to the parent, and the two outputs of every scenario: a table for
//! people and JSON for machines.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::{Deserialize, Serialize};

/// Largest latency a histogram tracks: one hour in microseconds (larger values saturate).
const MAX_MICROS: u64 = 3_600_000_000;

/// An empty latency histogram: 1 µs to one hour, three significant figures.
pub fn histogram() -> Histogram<u64> {
    #[allow(clippy::unwrap_used)] // constant, valid bounds
    Histogram::new_with_bounds(1, MAX_MICROS, 3).unwrap()
}

/// A latency histogram many tasks record into: a fixed number of locked shards, merged when
/// read. A thread records into a shard of its own (threads take the next shard at their first
/// record), so a runtime's few worker threads neither wait for each other's locks nor pull
/// each other's counts into their caches: at 300,000 records a second, a shard picked per task
/// had every record touch another ~190 KiB histogram (8.5 % of the fan-out generator's CPU).
/// One histogram per connection would cost that much each; 16 shards cost the same whatever
/// the connection count.
#[derive(Debug)]
pub struct Recorder {
    shards: Box<[Mutex<Histogram<u64>>]>,
}

/// The calling thread's number: threads take consecutive numbers at their first call.
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            shards: (0..16).map(|_| Mutex::new(histogram())).collect(),
        }
    }
}

impl Recorder {
    /// Records `micros` into the calling thread's shard.
    pub fn record(&self, micros: u64) {
        let shard = &self.shards[thread_number() % self.shards.len()];
        let mut h = shard.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(micros.max(1));
    }

    /// All shards merged into one histogram.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            let h = shard.lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds everywhere: adding cannot fail.
            let _ = all.add(&*h);
        }
        all
    }
}

/// Percentiles of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    /// The summary of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// A histogram as base64 of its V2 serialization (how storm workers send theirs).
pub fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

/// The inverse of [`encode`].
pub fn decode(s: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .context("histogram: bad base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("deserializing a histogram: {e:?}"))
}

/// A two-column table: a title, then `name | value` rows, some of them section headers.
#[derive(Debug, Default)]
pub struct Table {
    title: String,
    rows: Vec<(String, String)>,
}

impl Table {
    /// A table titled `title`.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    /// One row.
    pub fn row(&mut self, name: impl Into<String>, value: impl std::fmt::Display) -> &mut Self {
        self.rows.push((name.into(), value.to_string()));
        self
    }

    /// A rate row (`12,345.6/s`).
    pub fn rate(&mut self, name: impl Into<String>, per_sec: f64) -> &mut Self {
        self.row(name, format!("{per_sec:.1}/s"))
    }

    /// A latency row: p50 / p95 / p99 / max in ms, and the sample count.
    pub fn latency(&mut self, name: impl Into<String>, l: &Latency) -> &mut Self {
        self.row(
            name,
            format!(
                "p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n = {})",
                l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.count
            ),
        )
    }

    /// Failure rows by cause (or one `none` row).
    pub fn failures(
        &mut self,
        name: &str,
        by_cause: &std::collections::BTreeMap<String, u64>,
    ) -> &mut Self {
        if by_cause.is_empty() {
            return self.row(name, "none");
        }
        for (cause, n) in by_cause {
            self.row(format!("{name}: {cause}"), n);
        }
        self
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let width = self.rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        let mut out = format!("{}\n", self.title);
        let _ = writeln!(out, "{}", "-".repeat(self.title.len().max(width + 20)));
        for (name, value) in &self.rows {
            let _ = writeln!(out, "{name:<width$}  {value}");
        }
        out
    }
}

/// What every scenario returns: JSON for machines, a table for people, and whether the run met
/// its correctness bar (no failures, no gaps, no duplicates).
pub trait Outcome: Serialize {
    /// The table for people.
    fn table(&self) -> Table;
    /// True when nothing failed and nothing was lost or duplicated.
    fn passed(&self) -> bool;
}

/// Per-second rate of `n` over `secs` (0 when no time passed).
pub fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_round_trip_and_merge() {
        let r = Recorder::default();
        for i in 1..=1000u64 {
            r.record(i * 10);
        }
        let h = r.merged();
        assert_eq!(h.len(), 1000);
        let back = decode(&encode(&h).expect("encode")).expect("decode");
        assert_eq!(back.len(), 1000);
        let l = Latency::of(&back);
        assert!((l.p50_ms - 5.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 10.0).abs() < 0.1, "{l:?}");
    }
}
