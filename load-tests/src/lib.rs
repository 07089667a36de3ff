//! gochat's load generator and benchmarks, as a library (the `gochat-load` binary is its
//! command line; the smoke tests drive the same functions against an in-process server).
//!
//! WebSocket scenarios against a running `gochat serve`, each returning an [`report::Outcome`]
//! (a table for people, JSON for machines, and whether the run met its correctness bar):
//!
//! - [`storm`]: N authenticated connections opened at R/s (over several processes and source
//!   addresses when N needs it), held, closed; accept rate, connect latency, failures by cause,
//!   the server's memory per connection.
//! - [`chat`]: users in pairs and groups sending at a fixed rate; stored and delivered per
//!   second, end-to-end and ack latency, and the seq check of every stream ([`seqcheck`]).
//! - [`fanout`]: one publisher, K members in the world room or a large group; deliveries per
//!   second, publish → recipient and publish → last recipient latency.
//! - [`churn`]: steady connects and disconnects beside seq-checked chat traffic.
//!
//! Data flows the same way in each: [`guard`] checks the target is loopback (unless allowed),
//! [`users`] makes or reuses the users, [`client`] opens the connections and speaks the frames
//! (the connections that read most through [`rawws`], a lean client WebSocket),
//! the scenario's connection tasks record into [`report`] histograms and [`progress`] counters,
//! and the scenario folds it all into its outcome. [`repo_bench`] is the data-layer benchmark,
//! which runs the repo service in-process instead.

pub mod chat;
pub mod churn;
pub mod client;
pub mod fanout;
pub mod guard;
pub mod procfs;
pub mod progress;
pub mod rawws;
pub mod repo_bench;
pub mod report;
pub mod seqcheck;
pub mod storm;
pub mod traffic;
pub mod users;
