//! The data-layer benchmark.
//!
//! Scenarios, each through the repo service's MessageService in-process (validation, store,
//! cache upkeep: what `serve` mode pays per batch):
//!
//! - `one-conversation`: one writer reserves 100 seqs, saves the 100 messages in one
//!   `SaveMessages` call, repeats (a Conversation actor's loop).
//! - `many-conversations`: `--writers` concurrent writers (like Conversation actors on several
//!   arbiters), each owning a share of 1,000 conversations and storing one 100-message batch
//!   into each in turn.
//! - `mixed-batches`: the harder variant: every 100-message batch spreads over 100 of the
//!   1,000 conversations (100 seq reservations and 100 conversation-row updates per batch).
//! - `seq-blocks`: `GenerateSeqID` with `count = --block` in a loop on `--writers` tasks.
//!
//! Figures are messages (or seqs) per second of wall time, with batch latency percentiles.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};
use gochat_infra::ids::Snowflake;
use gochat_proto::repo as pb;
use gochat_proto::repo::message_service_server::MessageService;
use gochat_repo::cache::AnyCache;
use gochat_repo::cache::memory::MemoryCache;
use gochat_repo::cache::redis::RedisCache;
use gochat_repo::store::AnyStore;
use gochat_repo::{Repo, RepoSettings};
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::Request;

/// Options of `gochat-load repo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `sqlite` (a fresh temp file), or a `mysql://user@host:port/db` URL (the database is
    /// dropped and created anew).
    #[arg(long, default_value = "sqlite")]
    database: String,
    /// `memory`, or a `redis://` URL (a fresh namespace is used and flushed).
    #[arg(long, default_value = "memory")]
    cache: String,
    /// Messages stored per persistence scenario.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Concurrent writers in the many-conversations and seq-blocks scenarios.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Seqs per GenerateSeqID call in seq-blocks.
    #[arg(long, default_value_t = 100)]
    block: i64,
    /// Seconds the seq-blocks scenario runs.
    #[arg(long, default_value_t = 5)]
    seq_seconds: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Run only these scenarios (`one`, `many`, `mixed`, `seq`); all when empty.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Figure {
    scenario: String,
    database: String,
    cache: String,
    items: u64,
    seconds: f64,
    per_second: f64,
    batch_p50_ms: f64,
    batch_p99_ms: f64,
    batch_max_ms: f64,
}

const BATCH: usize = 100;

async fn open_store(database: &str) -> anyhow::Result<(AnyStore, Option<tempfile::TempDir>)> {
    if database == "sqlite" {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bench.db");
        let store = AnyStore::open(&path.to_string_lossy(), 4).await?;
        return Ok((store, Some(dir)));
    }
    if !database.starts_with("mysql://") {
        bail!("--database must be sqlite or a mysql:// URL");
    }
    let (server, db) = database
        .rsplit_once('/')
        .filter(|(s, d)| s.len() > "mysql:/".len() && !d.is_empty())
        .context("the mysql URL must name a database: mysql://user@host:port/db")?;
    let mut conn = AsyncMysqlConnection::establish(server).await?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS `{db}`"))
        .execute(&mut conn)
        .await?;
    diesel::sql_query(format!("CREATE DATABASE `{db}`"))
        .execute(&mut conn)
        .await?;
    Ok((AnyStore::open(database, 16).await?, None))
}

async fn open_cache(cache: &str) -> anyhow::Result<AnyCache> {
    if cache == "memory" {
        return Ok(AnyCache::Memory(MemoryCache::new(1_000_000)));
    }
    let ns = format!("gochat-bench-{}:", std::process::id());
    Ok(AnyCache::Redis(RedisCache::connect(cache, &ns).await?))
}

fn message(ids: &Snowflake, conv: &str, seq: i64, sender: i64) -> pb::SaveMessageRequest {
    let id = ids.next_id();
    pb::SaveMessageRequest {
        message_id: id.to_string(),
        conversation_id: conv.to_owned(),
        sender_id: sender.to_string(),
        message_type: 1,
        content: "the quick brown fox jumps over the lazy dog, 64 bytes of chat text".into(),
        seq_id: seq,
        client_msg_id: format!("c{id}"),
        created_at: 0,
    }
}

fn figure(
    scenario: &str,
    args: &Args,
    items: u64,
    elapsed: Duration,
    h: &Histogram<u64>,
) -> Figure {
    let secs = elapsed.as_secs_f64();
    Figure {
        scenario: scenario.into(),
        database: if args.database == "sqlite" {
            "sqlite".into()
        } else {
            "mysql".into()
        },
        cache: if args.cache == "memory" {
            "memory".into()
        } else {
            "redis".into()
        },
        items,
        seconds: secs,
        per_second: items as f64 / secs,
        batch_p50_ms: h.value_at_quantile(0.50) as f64 / 1000.0,
        batch_p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        batch_max_ms: h.max() as f64 / 1000.0,
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

async fn one_conversation(repo: &Repo, args: &Args) -> anyhow::Result<Figure> {
    let ids = Snowflake::new(1);
    let conv = "s_1_2";
    let batches = args.messages.div_ceil(BATCH);
    let mut h = histogram()?;
    let start = Instant::now();
    for _ in 0..batches {
        let t = Instant::now();
        let seqs = repo
            .generate_seq_id(Request::new(pb::GenerateSeqIdRequest {
                conversation_id: conv.into(),
                count: BATCH as i64,
                from_stored: false,
            }))
            .await?
            .into_inner();
        let messages = (0..BATCH as i64)
            .map(|i| message(&ids, conv, seqs.seq_id + i, 1))
            .collect();
        repo.save_messages(Request::new(pb::SaveMessagesRequest {
            messages,
            ..Default::default()
        }))
        .await?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(figure(
        "one-conversation",
        args,
        (batches * BATCH) as u64,
        start.elapsed(),
        &h,
    ))
}

async fn many_conversations(repo: &Repo, args: &Args) -> anyhow::Result<Figure> {
    let batches = args.messages.div_ceil(BATCH);
    let writers = args.writers.max(1);
    let per_writer = batches.div_ceil(writers);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let repo = repo.clone();
        tasks.spawn(async move {
            let ids = Snowflake::new(200 + w as u16);
            let mut h = histogram()?;
            // Writer w owns conversations w, w + writers, ... of the 1,000 (like actors: one
            // owner per conversation) and stores one 100-message batch into each in turn.
            let convs: Vec<String> = (0..1000)
                .filter(|c| c % writers == w)
                .map(|c| format!("s_{}_{}", 20_000 + c, 30_000 + c))
                .collect();
            for i in 0..per_writer {
                let conv = &convs[i % convs.len()];
                let t = Instant::now();
                let seqs = repo
                    .generate_seq_id(Request::new(pb::GenerateSeqIdRequest {
                        conversation_id: conv.clone(),
                        count: BATCH as i64,
                        from_stored: false,
                    }))
                    .await?
                    .into_inner();
                let messages = (0..BATCH as i64)
                    .map(|k| message(&ids, conv, seqs.seq_id + k, 1))
                    .collect();
                repo.save_messages(Request::new(pb::SaveMessagesRequest {
                    messages,
                    ..Default::default()
                }))
                .await?;
                h.record(t.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(h)
        });
    }
    let mut h = histogram()?;
    while let Some(r) = tasks.join_next().await {
        h.add(r??)?;
    }
    let items = (per_writer * writers * BATCH) as u64;
    Ok(figure(
        "many-conversations(1000)",
        args,
        items,
        start.elapsed(),
        &h,
    ))
}

async fn mixed_batches(repo: &Repo, args: &Args) -> anyhow::Result<Figure> {
    let batches = args.messages.div_ceil(BATCH);
    let per_writer = batches.div_ceil(args.writers.max(1));
    let writers = args.writers.max(1);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let repo = repo.clone();
        tasks.spawn(async move {
            let ids = Snowflake::new(100 + w as u16);
            let mut h = histogram()?;
            // Each writer owns 1000 / writers conversations' worth of the 1,000 (disjoint), so
            // seqs are reserved per conversation without cross-writer races, like actors.
            let convs: Vec<String> = (0..1000)
                .filter(|c| c % writers == w)
                .map(|c| format!("s_{}_{}", 10 + c, 5000 + c))
                .collect();
            let mut next = 0usize;
            for _ in 0..per_writer {
                let t = Instant::now();
                let mut messages = Vec::with_capacity(BATCH);
                let mut by_conv: std::collections::HashMap<&str, i64> =
                    std::collections::HashMap::new();
                for _ in 0..BATCH {
                    let conv = &convs[next % convs.len()];
                    next += 1;
                    *by_conv.entry(conv.as_str()).or_default() += 1;
                }
                for (conv, n) in by_conv {
                    let seqs = repo
                        .generate_seq_id(Request::new(pb::GenerateSeqIdRequest {
                            conversation_id: conv.into(),
                            count: n,
                            from_stored: false,
                        }))
                        .await?
                        .into_inner();
                    for i in 0..n {
                        messages.push(message(&ids, conv, seqs.seq_id + i, 1));
                    }
                }
                repo.save_messages(Request::new(pb::SaveMessagesRequest {
                    messages,
                    ..Default::default()
                }))
                .await?;
                h.record(t.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(h)
        });
    }
    let mut h = histogram()?;
    while let Some(r) = tasks.join_next().await {
        h.add(r??)?;
    }
    let items = (per_writer * writers * BATCH) as u64;
    Ok(figure(
        "mixed-batches(1000)",
        args,
        items,
        start.elapsed(),
        &h,
    ))
}

async fn seq_blocks(repo: &Repo, args: &Args) -> anyhow::Result<Figure> {
    let deadline = Instant::now() + Duration::from_secs(args.seq_seconds.max(1));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..args.writers.max(1) {
        let repo = repo.clone();
        let block = args.block;
        tasks.spawn(async move {
            let mut h = histogram()?;
            let mut seqs = 0u64;
            let conv = format!("s_{}_{}", 70_000 + w, 80_000 + w);
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = repo
                    .generate_seq_id(Request::new(pb::GenerateSeqIdRequest {
                        conversation_id: conv.clone(),
                        count: block,
                        from_stored: false,
                    }))
                    .await?
                    .into_inner();
                anyhow::ensure!(r.end_seq_id - r.seq_id + 1 == block, "short block");
                seqs += block as u64;
                h.record(t.elapsed().as_micros().max(1) as u64)?;
            }
            anyhow::Ok((seqs, h))
        });
    }
    let mut h = histogram()?;
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        let (n, hh) = r??;
        total += n;
        h.add(hh)?;
    }
    Ok(figure(
        &format!("seq-blocks(count={})", args.block),
        args,
        total,
        start.elapsed(),
        &h,
    ))
}

/// Runs every scenario and prints the figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let (store, _dir) = open_store(&args.database).await?;
    let cache = open_cache(&args.cache).await?;
    let repo = Repo::new(store, cache, RepoSettings::default());
    let mut figures = Vec::new();
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    if wanted("one") {
        figures.push(one_conversation(&repo, &args).await?);
    }
    if wanted("many") {
        figures.push(many_conversations(&repo, &args).await?);
    }
    if wanted("mixed") {
        figures.push(mixed_batches(&repo, &args).await?);
    }
    if wanted("seq") {
        figures.push(seq_blocks(&repo, &args).await?);
    }
    if let AnyCache::Redis(c) = repo.cache() {
        use gochat_repo::cache::Cache;
        c.flush().await?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        println!(
            "{:<26} {:<7} {:<7} {:>9} {:>8} {:>12} {:>9} {:>9} {:>9}",
            "scenario", "db", "cache", "items", "secs", "items/s", "p50 ms", "p99 ms", "max ms"
        );
        for f in &figures {
            println!(
                "{:<26} {:<7} {:<7} {:>9} {:>8.2} {:>12.0} {:>9.2} {:>9.2} {:>9.2}",
                f.scenario,
                f.database,
                f.cache,
                f.items,
                f.seconds,
                f.per_second,
                f.batch_p50_ms,
                f.batch_p99_ms,
                f.batch_max_ms
            );
        }
    }
    Ok(())
}
