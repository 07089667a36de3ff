//! Bulk users: `{prefix}{i}` for i in 0..count, registered and logged in up front with bounded
//! parallelism, their access tokens cached in a file so the next run against the same server
//! reuses them instead of paying for thousands of logins again.
//!
//! The cache is trusted only while it works: one cached token is checked with `GET /users/me`
//! first; if the server refuses it (a new data directory, a new JWT secret), every user is
//! logged in (or registered) again. Tokens that expire within [`MIN_VALIDITY`] are renewed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::Http;
use crate::guard::Target;

/// The password of every load-test user.
pub const PASSWORD: &str = "load-test-password";

/// A cached token must stay valid at least this long to be reused.
pub const MIN_VALIDITY: Duration = Duration::from_secs(10 * 60);

/// A logged-in load-test user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    /// Position in the bulk set (the `i` of the username).
    pub index: usize,
    pub username: String,
    /// The user id the server gave it.
    pub id: String,
    /// The access token.
    pub token: String,
    /// When the access token expires (Unix ms).
    pub expires_at_ms: u64,
}

/// How to get the users.
#[derive(Debug, Clone)]
pub struct UserOptions {
    /// Usernames are `{prefix}{i}` (3..=32 characters of letters, digits, `_`, `.`, `-`).
    pub prefix: String,
    /// Concurrent register/login requests.
    pub parallel: usize,
    /// The token cache (None: no cache).
    pub cache: Option<PathBuf>,
    /// Print progress on stderr.
    pub progress: bool,
}

impl Default for UserOptions {
    fn default() -> Self {
        Self {
            prefix: "load".to_owned(),
            parallel: 32,
            cache: None,
            progress: false,
        }
    }
}

/// The default cache file for a target: `$TMPDIR/gochat-load-users-<host>-<port>.json`.
pub fn default_cache(target: &Target) -> PathBuf {
    let host = target.addr.ip().to_string().replace([':', '.'], "_");
    std::env::temp_dir().join(format!(
        "gochat-load-users-{host}-{}.json",
        target.addr.port()
    ))
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    server: String,
    prefix: String,
    users: Vec<User>,
}

fn now_ms() -> u64 {
    crate::client::now_micros() / 1000
}

fn load_cache(path: &Path, target: &Target, prefix: &str) -> Vec<User> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    match serde_json::from_str::<CacheFile>(&text) {
        Ok(c) if c.server == target.addr.to_string() && c.prefix == prefix => c.users,
        _ => Vec::new(),
    }
}

fn save_cache(path: &Path, target: &Target, prefix: &str, users: &[User]) -> anyhow::Result<()> {
    let file = CacheFile {
        server: target.addr.to_string(),
        prefix: prefix.to_owned(),
        users: users.to_vec(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&file)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Users `0..count`, from the cache where possible, otherwise registered and logged in.
pub async fn ensure(
    target: &Target,
    opts: &UserOptions,
    count: usize,
) -> anyhow::Result<Vec<User>> {
    let started = Instant::now();
    let http = Http::new(target, opts.parallel)?;
    let mut cached: HashMap<usize, User> = match &opts.cache {
        Some(path) => load_cache(path, target, &opts.prefix)
            .into_iter()
            .map(|u| (u.index, u))
            .collect(),
        None => HashMap::new(),
    };
    let fresh_enough = now_ms() + u64::try_from(MIN_VALIDITY.as_millis()).unwrap_or(0);
    if let Some(probe) = cached.values().find(|u| u.expires_at_ms > fresh_enough) {
        let (status, _) = http.get("/users/me", Some(&probe.token)).await?;
        if status != 200 {
            // Another server behind the same address: nothing cached is valid.
            cached.clear();
        }
    }

    let mut ready: Vec<Option<User>> = vec![None; count];
    let mut todo = Vec::new();
    for (i, slot) in ready.iter_mut().enumerate() {
        match cached.get(&i) {
            Some(u) if u.expires_at_ms > fresh_enough => *slot = Some(u.clone()),
            Some(_) => todo.push((i, true)),
            None => todo.push((i, false)),
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let total = todo.len();
    let ticker = opts.progress.then(|| {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "[users] {}/{total} registered or logged in",
                    done.load(Ordering::Relaxed)
                );
            }
        })
    });
    let mut results = futures::stream::iter(todo.into_iter().map(|(i, known)| {
        let http = http.clone();
        let username = format!("{}{i}", opts.prefix);
        let done = Arc::clone(&done);
        async move {
            let r = login_or_register(&http, i, &username, known).await;
            done.fetch_add(1, Ordering::Relaxed);
            r
        }
    }))
    .buffer_unordered(opts.parallel.max(1));
    let mut first_error = None;
    while let Some(r) = results.next().await {
        match r {
            Ok(u) => {
                let i = u.index;
                ready[i] = Some(u);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    // Save what worked even when something failed, so a retry starts from there.
    let mut all: Vec<User> = cached.into_values().collect();
    all.retain(|u| u.index >= count);
    all.extend(ready.iter().flatten().cloned());
    all.sort_by_key(|u| u.index);
    if let Some(path) = &opts.cache {
        save_cache(path, target, &opts.prefix, &all)?;
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if opts.progress && total > 0 {
        eprintln!(
            "[users] {count} users ready ({total} logged in or registered) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ready.into_iter().flatten().collect())
}

async fn login_or_register(
    http: &Http,
    index: usize,
    username: &str,
    known: bool,
) -> anyhow::Result<User> {
    if known && let Some(u) = login(http, index, username).await? {
        return Ok(u);
    }
    let (status, body) = http
        .post(
            "/auth/register",
            None,
            &json!({"username": username, "password": PASSWORD}),
        )
        .await?;
    if status != 201 && status != 409 {
        bail!("registering {username}: HTTP {status} {body}");
    }
    match login(http, index, username).await? {
        Some(u) => Ok(u),
        None => bail!("{username} exists with another password; use another --user-prefix"),
    }
}

/// Logs in; None when the server does not know this user/password.
async fn login(http: &Http, index: usize, username: &str) -> anyhow::Result<Option<User>> {
    let (status, body) = http
        .post(
            "/auth/login",
            None,
            &json!({"username": username, "password": PASSWORD}),
        )
        .await?;
    match status {
        200 => {}
        401 | 404 => return Ok(None),
        _ => bail!("logging in {username}: HTTP {status} {body}"),
    }
    let field = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let (Some(id), Some(token)) = (field(&body["user"]["id"]), field(&body["access_token"])) else {
        bail!("logging in {username}: unexpected answer {body}");
    };
    let expires_in = body["expires_in"].as_u64().unwrap_or(0);
    Ok(Some(User {
        index,
        username: username.to_owned(),
        id,
        token,
        expires_at_ms: now_ms() + expires_in * 1000,
    }))
}
