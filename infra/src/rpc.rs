//! Calls between services over gRPC (distributed mode): a deadline on every call, retries with
//! the spec's backoff ("重试策略": 3 retries, 100 ms initial delay, x2, at most 5 s) only where
//! the call is idempotent, and the caller's metadata (the `x-trace-id`) carried into every
//! attempt.
//!
//! The client adapters (`gochat_repo::client::RepoClient`, `gochat_logic::client::LogicClient`)
//! implement the services' server traits by calling [`call`] around the generated tonic clients,
//! so the services themselves never know whether a dependency is in-process or remote.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tonic::{Code, Request, Response, Status};

/// gRPC metadata key carrying the request's trace id from the gateway through every service.
pub const TRACE_METADATA_KEY: &str = "x-trace-id";

/// How calls to one service are made.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcPolicy {
    /// Deadline of one attempt (sent as `grpc-timeout` and enforced locally).
    pub timeout: Duration,
    /// Attempts after the first, for idempotent calls (spec `MaxRetries`: 3).
    pub max_retries: usize,
    /// Wait before the first retry (spec: 100 ms); doubles per retry.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (spec: 5 s).
    pub max_backoff: Duration,
}

impl Default for RpcPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_retries: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Whether an idempotent call that failed with `status` is worth another attempt: the server
/// could not be reached or did not answer in time, or said it is unavailable for now.
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted
    )
}

/// Whether an idempotent call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Repeating the call has the same effect as making it once: retried.
    Idempotent,
    /// A repeat could act twice (create, rotate, join): one attempt only.
    Once,
}

/// Every request of this RPC is safe to repeat (for [`forward_grpc!`]).
pub fn idempotent<T>(_: &T) -> Idempotency {
    Idempotency::Idempotent
}

/// No request of this RPC may be repeated (for [`forward_grpc!`]).
pub fn once<T>(_: &T) -> Idempotency {
    Idempotency::Once
}

/// Makes one call under `policy`: every attempt carries `request`'s metadata and message and a
/// deadline; an [`Idempotency::Idempotent`] call is retried on a retryable status with
/// exponential backoff. `attempt` makes one attempt (typically `|r| { let mut c =
/// client.clone(); async move { c.method(r).await } }`).
pub async fn call<Q, P, F, Fut>(
    policy: &RpcPolicy,
    idempotency: Idempotency,
    request: Request<Q>,
    mut attempt: F,
) -> Result<Response<P>, Status>
where
    Q: Clone,
    F: FnMut(Request<Q>) -> Fut,
    Fut: Future<Output = Result<Response<P>, Status>>,
{
    let (metadata, _, message) = request.into_parts();
    let timeout = policy.timeout;
    let once = || {
        let mut r = Request::from_parts(
            metadata.clone(),
            tonic::Extensions::default(),
            message.clone(),
        );
        r.set_timeout(timeout);
        let fut = attempt(r);
        async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                ))),
            }
        }
    };
    let retries = match idempotency {
        Idempotency::Idempotent => policy.max_retries,
        Idempotency::Once => 0,
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(policy.initial_backoff)
        .with_max_delay(policy.max_backoff)
        .with_factor(2.0)
        .with_max_times(retries);
    once.retry(backoff)
        .sleep(tokio::time::sleep)
        .when(is_retryable)
        .notify(|status: &Status, wait: Duration| {
            tracing::debug!(code = ?status.code(), cause = %status.message(), wait_ms = wait.as_millis() as u64, "retrying an idempotent call");
        })
        .await
}

/// Serves `routes` over gRPC on `listener` until `shutdown` resolves (then finishes the calls in
/// flight). Accepted connections get TCP_NODELAY: service calls are small and latency-bound.
pub async fn serve(
    routes: tonic::service::Routes,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _addr)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    });
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Implements a tonic server trait for a client adapter by forwarding each RPC to the generated
/// client in the adapter's field `$client` through [`call`] (deadline, retries where the request
/// is idempotent, metadata carried). Each RPC names a function from its request to its
/// [`Idempotency`]: [`idempotent`], [`once`], or one that looks at the request. The adapter has a
/// field `policy: RpcPolicy`; `$pb` is the module of the generated messages, in scope at the call
/// site.
///
/// ```ignore
/// gochat_infra::forward_grpc! {
///     impl UserService for RepoClient { client: users, pb: pb;
///         get_user(GetUserRequest) -> GetUserResponse: idempotent;
///         create_user(CreateUserRequest) -> CreateUserResponse: once;
///     }
/// }
/// ```
#[macro_export]
macro_rules! forward_grpc {
    (
        impl $service:ident for $adapter:ty { client: $client:ident, pb: $pb:ident;
            $( $method:ident ( $req:ident ) -> $resp:ident : $idem:expr ; )*
        }
    ) => {
        #[tonic::async_trait]
        impl $service for $adapter {
            $(
                async fn $method(
                    &self,
                    request: tonic::Request<$pb::$req>,
                ) -> Result<tonic::Response<$pb::$resp>, tonic::Status> {
                    let client = self.$client.clone();
                    let idempotency: $crate::rpc::Idempotency = ($idem)(request.get_ref());
                    $crate::rpc::call(
                        &self.policy,
                        idempotency,
                        request,
                        move |r| {
                            let mut c = client.clone();
                            async move { c.$method(r).await }
                        },
                    )
                    .await
                }
            )*
        }
    };
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn quick() -> RpcPolicy {
        RpcPolicy {
            timeout: Duration::from_secs(2),
            max_retries: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        }
    }

    type Answer = std::future::Ready<Result<Response<u32>, Status>>;

    /// An attempt function failing with `code` the first `fail` times, recording each attempt's
    /// trace id.
    fn flaky(
        fail: usize,
        code: Code,
        seen: Arc<std::sync::Mutex<Vec<String>>>,
    ) -> (Arc<AtomicUsize>, impl FnMut(Request<u32>) -> Answer) {
        let n = Arc::new(AtomicUsize::new(0));
        let count = n.clone();
        let f = move |r: Request<u32>| {
            let k = count.fetch_add(1, Ordering::SeqCst);
            let trace = r
                .metadata()
                .get(TRACE_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            seen.lock().expect("lock").push(trace);
            assert!(r.metadata().get("grpc-timeout").is_some(), "a deadline");
            std::future::ready(if k < fail {
                Err(Status::new(code, "not now"))
            } else {
                Ok(Response::new(*r.get_ref() + 1))
            })
        };
        (n, f)
    }

    fn traced(v: u32) -> Request<u32> {
        let mut r = Request::new(v);
        r.metadata_mut()
            .insert(TRACE_METADATA_KEY, "t-1".parse().expect("ascii"));
        r
    }

    #[tokio::test]
    async fn idempotent_calls_retry_transient_failures_with_the_metadata() {
        let seen = Arc::default();
        let (n, f) = flaky(2, Code::Unavailable, Arc::clone(&seen));
        let r = call(&quick(), Idempotency::Idempotent, traced(41), f)
            .await
            .expect("third attempt succeeds");
        assert_eq!(r.into_inner(), 42);
        assert_eq!(n.load(Ordering::SeqCst), 3);
        assert_eq!(*seen.lock().expect("lock"), vec!["t-1"; 3]);
    }

    #[tokio::test]
    async fn retries_stop_after_the_policy() {
        let (n, f) = flaky(100, Code::Unavailable, Arc::default());
        let err = call(&quick(), Idempotency::Idempotent, traced(1), f)
            .await
            .expect_err("gives up");
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(n.load(Ordering::SeqCst), 4, "one attempt and three retries");
    }

    #[tokio::test]
    async fn non_idempotent_and_final_errors_are_not_retried() {
        let (n, f) = flaky(1, Code::Unavailable, Arc::default());
        let err = call(&quick(), Idempotency::Once, traced(1), f)
            .await
            .expect_err("no retry");
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(n.load(Ordering::SeqCst), 1);

        let (n, f) = flaky(1, Code::InvalidArgument, Arc::default());
        let err = call(&quick(), Idempotency::Idempotent, traced(1), f)
            .await
            .expect_err("a refusal is final");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_silent_server_hits_the_deadline() {
        let policy = RpcPolicy {
            timeout: Duration::from_millis(20),
            max_retries: 1,
            ..quick()
        };
        let attempts = Arc::new(AtomicUsize::new(0));
        let a = attempts.clone();
        let err = call(&policy, Idempotency::Idempotent, traced(1), move |_r| {
            a.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<Response<u32>, Status>>()
        })
        .await
        .expect_err("deadline");
        assert_eq!(err.code(), Code::DeadlineExceeded);
        assert_eq!(attempts.load(Ordering::SeqCst), 2, "retried once");
    }
}
