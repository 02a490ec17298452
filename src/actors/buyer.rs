//! One actor per buyer: owns the buyer's pooled keep-alive HTTP client, caps its requests in
//! flight, and reports every ping and post outcome. Protocol decisions live in `buyers/`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Context, Handler, ResponseFuture};
use bytes::{Bytes, BytesMut};
use metrics::{counter, gauge, histogram};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

use super::messages::{Ping, PingResult, Post, PostResult};
use crate::buyers::{self, NoBid, PingReply, PostReply, Refusal, ReplyMapping};
use crate::clock::Clock;
use crate::domain::breaker::{Breaker, BreakerState, Permit};
use crate::telemetry;

/// A buyer's circuit breaker, shared by the buyer's actor (which records outcomes) and the
/// campaigns (which ask before pinging). Changes are logged and exported as a gauge.
pub struct BuyerHealth {
    id: String,
    breaker: Mutex<Breaker>,
    clock: Clock,
    /// When a failed ping was last logged (ms): a buyer that is down fails every ping.
    failure_logged_ms: AtomicI64,
}

impl BuyerHealth {
    pub fn new(id: &str, failures_to_open: u32, cooldown: Duration, clock: Clock) -> BuyerHealth {
        gauge!(telemetry::BUYER_BREAKER_STATE, "buyer" => id.to_owned())
            .set(BreakerState::Closed.gauge_value());
        BuyerHealth {
            id: id.to_owned(),
            breaker: Mutex::new(Breaker::new(failures_to_open, cooldown.as_millis() as i64)),
            clock,
            failure_logged_ms: AtomicI64::new(i64::MIN),
        }
    }

    /// Whether a failure now is the first in a minute for this buyer (then it is logged).
    pub fn first_failure_in_a_minute(&self) -> bool {
        let now = self.clock.now_ms();
        let last = self.failure_logged_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 60_000
            && self
                .failure_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub fn state(&self) -> BreakerState {
        self.breaker.lock().expect("breaker").state()
    }

    /// May the buyer be sent a request now? A `Probe` is the one request that decides.
    pub fn permit(&self) -> Permit {
        let (before, permit) = {
            let mut breaker = self.breaker.lock().expect("breaker");
            let before = breaker.state();
            (before, breaker.permit(self.clock.now_ms()))
        };
        // A lost probe replaced in half-open is no change of state.
        if matches!(permit, Permit::Probe(_)) && before == BreakerState::Open {
            self.changed(BreakerState::HalfOpen);
        }
        permit
    }

    /// The probe `permit` gave (`Permit::Probe(since_ms)`) was not used: the next request may
    /// probe at once.
    pub fn probe_unused(&self, since_ms: i64) {
        self.breaker.lock().expect("breaker").probe_unused(since_ms);
    }

    /// Records an answer (`true`) or a timeout/error (`false`).
    pub fn record(&self, success: bool) {
        let change = self
            .breaker
            .lock()
            .expect("breaker")
            .record(success, self.clock.now_ms());
        if let Some(state) = change {
            self.changed(state);
        }
    }

    fn changed(&self, state: BreakerState) {
        gauge!(telemetry::BUYER_BREAKER_STATE, "buyer" => self.id.clone()).set(state.gauge_value());
        match state {
            BreakerState::Open => {
                tracing::warn!(buyer = %self.id, state = state.as_str(), "buyer breaker changed")
            }
            _ => tracing::info!(buyer = %self.id, state = state.as_str(), "buyer breaker changed"),
        }
    }
}

/// Whether a ping outcome tells the breaker the buyer is healthy (`Some(true)`), failing
/// (`Some(false)`) or nothing (our own in-flight limit).
fn ping_health(reply: &PingReply) -> Option<bool> {
    match reply {
        PingReply::Bid { .. } | PingReply::NoBid(NoBid::Declined) => Some(true),
        PingReply::NoBid(NoBid::Overloaded) => None,
        PingReply::NoBid(_) => Some(false),
    }
}

fn post_health(reply: &PostReply) -> Option<bool> {
    match reply {
        PostReply::Accepted | PostReply::Refused(Refusal::Declined, _) => Some(true),
        PostReply::Refused(Refusal::Overloaded, _) => None,
        PostReply::Refused(..) => Some(false),
    }
}

/// Replies larger than this are treated as a bad body.
const MAX_REPLY_BYTES: usize = 64 * 1024;

pub struct BuyerSettings {
    pub id: String,
    pub ping_url: Option<String>,
    pub post_url: String,
    pub headers: Vec<(String, String)>,
    pub max_in_flight: usize,
    /// h2c with prior knowledge (`http2` in the config).
    pub http2: bool,
    /// Certificate authorities trusted for this buyer besides the public roots (`ca_file`).
    pub ca_certs: Vec<reqwest::Certificate>,
    /// Requests in flight to this buyer from every actor of it on this node (one per HTTP
    /// worker), so `max_in_flight` holds per node.
    pub in_flight: Arc<AtomicUsize>,
    pub mapping: ReplyMapping,
    pub health: Arc<BuyerHealth>,
}

pub struct BuyerActor {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    ping_url: Option<reqwest::Url>,
    post_url: reqwest::Url,
    transport: Transport,
    mapping: ReplyMapping,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    health: Arc<BuyerHealth>,
    metrics: BuyerMetrics,
}

/// The buyer's series with fixed labels, looked up once instead of per request.
struct BuyerMetrics {
    in_flight: metrics::Gauge,
    ping_duration: metrics::Histogram,
    post_duration: metrics::Histogram,
    /// The outcomes of almost every request; the others are looked up when they happen.
    pings_bid: metrics::Counter,
    posts_accepted: metrics::Counter,
    post_value: metrics::Counter,
}

impl BuyerMetrics {
    fn new(id: &str) -> BuyerMetrics {
        BuyerMetrics {
            in_flight: gauge!(telemetry::BUYER_IN_FLIGHT, "buyer" => id.to_owned()),
            ping_duration: histogram!(telemetry::BUYER_PING_DURATION, "buyer" => id.to_owned()),
            post_duration: histogram!(telemetry::BUYER_POST_DURATION, "buyer" => id.to_owned()),
            pings_bid: counter!(telemetry::BUYER_PINGS_TOTAL, "buyer" => id.to_owned(), "outcome" => "bid"),
            posts_accepted: counter!(telemetry::BUYER_POSTS_TOTAL, "buyer" => id.to_owned(), "outcome" => "accepted"),
            post_value: counter!(telemetry::BUYER_POST_VALUE, "buyer" => id.to_owned()),
        }
    }
}

enum CallError {
    Timeout,
    /// No answer could be had (refused, reset, TLS); why, for the log.
    Transport(String),
    TooLarge,
    Overloaded,
}

/// A transport failure with its whole chain of causes (`what: error: cause: cause`).
fn transport(what: &str, error: &dyn std::error::Error) -> CallError {
    CallError::Transport(format!("{what}: {}", telemetry::error_chain(error)))
}

impl BuyerActor {
    pub fn new(settings: BuyerSettings) -> Result<BuyerActor, String> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &settings.headers {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|e| format!("buyer {}: header {name}: {e}", settings.id))?;
            let value = HeaderValue::try_from(value.as_str())
                .map_err(|e| format!("buyer {}: header value: {e}", settings.id))?;
            headers.insert(name, value);
        }
        let parse = |u: &str| {
            reqwest::Url::parse(u).map_err(|e| format!("buyer {}: {u}: {e}", settings.id))
        };
        let ping_url = settings.ping_url.as_deref().map(parse).transpose()?;
        let post_url = parse(&settings.post_url)?;
        headers.insert(
            reqwest::header::USER_AGENT,
            HeaderValue::from_static(USER_AGENT),
        );
        let transport = if settings.http2 && post_url.scheme() == "http" {
            Transport::H2c(Box::new(H2c::new(
                &settings.id,
                &post_url,
                ping_url.as_ref(),
                headers,
            )?))
        } else {
            Transport::Pooled(Self::pooled_client(&settings, headers)?)
        };
        Ok(BuyerActor {
            inner: Arc::new(Inner {
                ping_url,
                post_url,
                metrics: BuyerMetrics::new(&settings.id),
                id: settings.id,
                transport,
                mapping: settings.mapping,
                in_flight: settings.in_flight,
                max_in_flight: settings.max_in_flight,
                health: settings.health,
            }),
        })
    }

    /// HTTP/1.1 keep-alive pool (HTTP/2 when a TLS buyer offers it; h2c when asked for a
    /// buyer this client cannot dial itself). Redirects are not followed: a buyer's 3xx is its
    /// answer (no bid, or a refused post), so a lead's personal data only ever goes to the
    /// `post_url` the operator configured.
    fn pooled_client(
        settings: &BuyerSettings,
        headers: HeaderMap,
    ) -> Result<reqwest::Client, String> {
        let mut client = reqwest::Client::builder();
        if settings.http2 {
            client = client.http2_prior_knowledge();
        }
        for cert in &settings.ca_certs {
            client = client.add_root_certificate(cert.clone());
        }
        client
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(settings.max_in_flight.min(512))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("buyer {}: http client: {e}", settings.id))
    }
}

const USER_AGENT: &str = concat!("leadex/", env!("CARGO_PKG_VERSION"));

/// The certificates of a buyer's `ca_file` (PEM, one or more), read once at start-up.
pub fn read_ca_file(path: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no PEM certificate in it"));
    }
    Ok(certs)
}

/// How requests reach a buyer.
enum Transport {
    /// reqwest's pooled client.
    Pooled(reqwest::Client),
    /// One HTTP/2 connection without TLS (prior knowledge) per actor, many streams on it:
    /// a request in flight costs a stream, not a connection and its buffers.
    H2c(Box<H2c>),
}

struct H2c {
    /// `host:port` to dial.
    authority: String,
    ping_uri: Option<http::Uri>,
    post_uri: http::Uri,
    headers: HeaderMap,
    conn: Mutex<Option<H2Conn>>,
    /// One dial at a time; requests arriving meanwhile wait for it and share it.
    dialing: tokio::sync::Mutex<()>,
}

/// A live h2c connection: the handle that opens streams on it, and whether its task ended.
#[derive(Clone)]
struct H2Conn {
    sender: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// A keep-alive PING goes out after this long, and the connection is dropped when its PONG
/// does not come back within `H2_KEEPALIVE_TIMEOUT`.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl H2c {
    fn new(
        id: &str,
        post_url: &reqwest::Url,
        ping_url: Option<&reqwest::Url>,
        headers: HeaderMap,
    ) -> Result<H2c, String> {
        let uri = |u: &reqwest::Url| {
            u.as_str()
                .parse::<http::Uri>()
                .map_err(|e| format!("buyer {id}: {u}: {e}"))
        };
        if let Some(ping) = ping_url
            && (ping.host_str(), ping.port_or_known_default())
                != (post_url.host_str(), post_url.port_or_known_default())
        {
            return Err(format!(
                "buyer {id}: http2 needs ping_url and post_url on one host and port"
            ));
        }
        let host = post_url
            .host_str()
            .ok_or_else(|| format!("buyer {id}: {post_url}: no host"))?;
        let port = post_url.port_or_known_default().unwrap_or(80);
        Ok(H2c {
            authority: format!("{host}:{port}"),
            ping_uri: ping_url.map(uri).transpose()?,
            post_uri: uri(post_url)?,
            headers,
            conn: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
        })
    }

    fn live(&self) -> Option<h2::client::SendRequest<Bytes>> {
        let conn = self.conn.lock().expect("h2c connection");
        conn.as_ref()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .map(|c| c.sender.clone())
    }

    /// The live connection's sender, dialling (once, for every waiting request) when there
    /// is none or it closed.
    async fn sender(&self) -> Result<h2::client::SendRequest<Bytes>, CallError> {
        match self.live() {
            Some(sender) => Ok(sender),
            // Boxed: the dial's state is needed once per connection, not in every request.
            None => Box::pin(self.dial()).await,
        }
    }

    async fn dial(&self) -> Result<h2::client::SendRequest<Bytes>, CallError> {
        let _dialing = self.dialing.lock().await;
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| CallError::Timeout)?
        .map_err(|e| transport("connect", &e))?;
        let _ = stream.set_nodelay(true);
        let (sender, mut connection) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            h2::client::Builder::new().handshake::<_, Bytes>(stream),
        )
        .await
        .map_err(|_| CallError::Timeout)?
        .map_err(|e| transport("h2c handshake", &e))?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        let authority = self.authority.clone();
        let mut ping_pong = connection.ping_pong();
        tokio::spawn(async move {
            let keepalive = async {
                let Some(ping_pong) = ping_pong.as_mut() else {
                    return std::future::pending().await;
                };
                loop {
                    tokio::time::sleep(H2_KEEPALIVE).await;
                    let pong = tokio::time::timeout(
                        H2_KEEPALIVE_TIMEOUT,
                        ping_pong.ping(h2::Ping::opaque()),
                    )
                    .await;
                    if !matches!(pong, Ok(Ok(_))) {
                        return;
                    }
                }
            };
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!(%authority, error = %e, "h2c connection to buyer ended");
                    }
                }
                () = keepalive => {
                    tracing::debug!(%authority, "h2c connection to buyer dropped: no answer to a keep-alive ping");
                }
            }
            ended.store(true, Ordering::Release);
        });
        *self.conn.lock().expect("h2c connection") = Some(H2Conn {
            sender: sender.clone(),
            closed,
        });
        Ok(sender)
    }

    /// One request as a stream of the shared connection: headers, the body as one DATA
    /// frame, then the reply read with its flow-control capacity given back as it arrives.
    /// Dropping the future (the deadline) resets the stream.
    async fn call(&self, uri: &http::Uri, body: Bytes) -> Result<(u16, Bytes), CallError> {
        let sender = self.sender().await?;
        let mut sender = sender
            .ready()
            .await
            .map_err(|e| transport("h2c stream", &e))?;
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri.clone();
        *request.version_mut() = http::Version::HTTP_2;
        *request.headers_mut() = self.headers.clone();
        let end_of_stream = body.is_empty();
        let (response, mut stream) = sender
            .send_request(request, end_of_stream)
            .map_err(|e| transport("h2c request", &e))?;
        if !end_of_stream {
            stream
                .send_data(body, true)
                .map_err(|e| transport("h2c request body", &e))?;
        }
        let response = response.await.map_err(|e| transport("h2c reply", &e))?;
        let status = response.status().as_u16();
        let mut recv = response.into_body();
        let mut reply = BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(|e| transport("h2c reply body", &e))?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            if reply.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(CallError::TooLarge);
            }
            if reply.is_empty() && recv.is_end_stream() {
                // The usual reply: one DATA frame, kept without a copy.
                return Ok((status, chunk));
            }
            reply.extend_from_slice(&chunk);
        }
        Ok((status, reply.freeze()))
    }
}

#[derive(Clone, Copy)]
enum Endpoint {
    Ping,
    Post,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Actor for BuyerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Handlers return at once (the call runs as its own future), so a deep mailbox only
        // absorbs bursts; the real bound is `max_in_flight`.
        ctx.set_mailbox_capacity(4096);
    }
}

impl Inner {
    /// Sends one request, bounded by `deadline` and by the buyer's in-flight cap.
    async fn call(
        &self,
        endpoint: Endpoint,
        url: &reqwest::Url,
        body: Bytes,
        deadline: Instant,
    ) -> Result<(u16, Bytes), CallError> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(CallError::Overloaded);
        }
        self.metrics.in_flight.increment(1.0);
        let request = async {
            match &self.transport {
                // Boxed: reqwest's request future is larger than an h2c stream's, and the
                // HTTP/2 path should not carry its size in every ping.
                Transport::Pooled(client) => Box::pin(pooled_call(client, url, body)).await,
                Transport::H2c(h2c) => {
                    let uri = match endpoint {
                        Endpoint::Ping => h2c.ping_uri.as_ref().unwrap_or(&h2c.post_uri),
                        Endpoint::Post => &h2c.post_uri,
                    };
                    h2c.call(uri, body).await
                }
            }
        };
        let result = match tokio::time::timeout_at(deadline, request).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout),
        };
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.metrics.in_flight.decrement(1.0);
        result
    }
}

/// One request through the pooled client, its reply read up to `MAX_REPLY_BYTES`.
async fn pooled_call(
    client: &reqwest::Client,
    url: &reqwest::Url,
    body: Bytes,
) -> Result<(u16, Bytes), CallError> {
    let mut response = client
        .post(url.clone())
        .body(body)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                CallError::Timeout
            } else {
                transport("request", &e)
            }
        })?;
    let status = response.status().as_u16();
    let mut reply = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport("reply body", &e))?
    {
        if reply.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(CallError::TooLarge);
        }
        reply.extend_from_slice(&chunk);
    }
    Ok((status, Bytes::from(reply)))
}

impl Handler<Ping> for BuyerActor {
    type Result = ResponseFuture<PingResult>;

    fn handle(&mut self, msg: Ping, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            let started = Instant::now();
            let reply = match &inner.ping_url {
                None => PingReply::NoBid(NoBid::Declined),
                Some(url) => match inner
                    .call(Endpoint::Ping, url, msg.body, msg.deadline)
                    .await
                {
                    Ok((status, body)) => buyers::parse_ping_reply(status, &body, &inner.mapping),
                    Err(CallError::Timeout) => PingReply::NoBid(NoBid::Timeout),
                    Err(CallError::Transport(why)) => {
                        if inner.health.first_failure_in_a_minute() {
                            tracing::warn!(buyer = %inner.id, error = %why, "buyer ping failed");
                        }
                        PingReply::NoBid(NoBid::Transport)
                    }
                    Err(CallError::TooLarge) => PingReply::NoBid(NoBid::BadBody),
                    Err(CallError::Overloaded) => PingReply::NoBid(NoBid::Overloaded),
                },
            };
            let answered_at = Instant::now();
            let latency = answered_at - started;
            let reply = match reply {
                // A bid read after the deadline does not count in the auction: it is counted
                // here as what it is for the auction, a timeout.
                PingReply::Bid { .. } if answered_at > msg.deadline => {
                    PingReply::NoBid(NoBid::Timeout)
                }
                reply => reply,
            };
            if inner.ping_url.is_some()
                && let Some(healthy) = ping_health(&reply)
            {
                inner.health.record(healthy);
            }
            match &reply {
                PingReply::Bid { .. } => inner.metrics.pings_bid.increment(1),
                PingReply::NoBid(why) => counter!(telemetry::BUYER_PINGS_TOTAL, "buyer" => inner.id.clone(), "outcome" => why.as_str()).increment(1),
            }
            inner.metrics.ping_duration.record(latency.as_secs_f64());
            PingResult {
                reply,
                latency,
                answered_at,
            }
        })
    }
}

impl Handler<Post> for BuyerActor {
    type Result = ResponseFuture<PostResult>;

    fn handle(&mut self, msg: Post, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            let started = Instant::now();
            let reply = match inner
                .call(Endpoint::Post, &inner.post_url, msg.body, msg.deadline)
                .await
            {
                Ok((status, body)) => buyers::parse_post_reply(status, &body, &inner.mapping),
                Err(CallError::Timeout) => PostReply::Refused(Refusal::Timeout, None),
                // Why goes to the auction log, and the campaign logs it with the lead.
                Err(CallError::Transport(why)) => PostReply::Refused(Refusal::Transport, Some(why)),
                Err(CallError::TooLarge) => PostReply::Refused(Refusal::BadBody, None),
                Err(CallError::Overloaded) => PostReply::Refused(Refusal::Overloaded, None),
            };
            let latency = started.elapsed();
            if let Some(healthy) = post_health(&reply) {
                inner.health.record(healthy);
            }
            match &reply {
                PostReply::Accepted => {
                    inner.metrics.posts_accepted.increment(1);
                    inner
                        .metrics
                        .post_value
                        .increment(msg.price_cents.max(0) as u64);
                }
                PostReply::Refused(why, _) => counter!(telemetry::BUYER_POSTS_TOTAL, "buyer" => inner.id.clone(), "outcome" => why.as_str()).increment(1),
            }
            inner.metrics.post_duration.record(latency.as_secs_f64());
            PostResult { reply, latency }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_ping_is_logged_once_a_minute_per_buyer() {
        let clock = Clock::manual(1_000);
        let health = BuyerHealth::new("b", 5, Duration::from_secs(30), clock.clone());
        assert!(health.first_failure_in_a_minute());
        assert!(!health.first_failure_in_a_minute());
        clock.advance_ms(59_999);
        assert!(!health.first_failure_in_a_minute());
        clock.advance_ms(1);
        assert!(health.first_failure_in_a_minute());
        assert!(!health.first_failure_in_a_minute());
    }

    #[actix_rt::test]
    async fn a_transport_failure_names_its_deepest_cause() {
        // A loopback port with nothing listening on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = reqwest::Client::new();
        let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}/ping")).unwrap();
        let Err(CallError::Transport(why)) = pooled_call(&client, &url, Bytes::new()).await else {
            panic!("a closed port is a transport failure");
        };
        assert!(why.starts_with("request: error sending request"), "{why}");
        assert!(why.contains("Connection refused"), "{why}");
    }

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = read_ca_file(missing.to_str().unwrap()).unwrap_err();
        assert!(err.starts_with(missing.to_str().unwrap()), "{err}");
        let empty = dir.path().join("key-only.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = read_ca_file(empty.to_str().unwrap()).unwrap_err();
        assert!(err.ends_with("no PEM certificate in it"), "{err}");
    }
}
