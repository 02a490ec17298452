//! `POST /api/leads` and `GET /api/leads/{lead_id}`, with the contract's order of checks:
//! authentication -> rate limit -> body -> seller and campaign -> fields -> auction.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use futures::StreamExt;
use metrics::counter;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState, MAX_BODY_BYTES, dto};
use crate::actors::{AuctionError, CampaignActor, RunAuction};
use crate::domain::lead::{CATEGORY, SELLER, text_value};
use crate::domain::{FieldMap, Lead};
use crate::ratelimit::Decision;
use crate::storage::IdempotentAnswer;
use crate::telemetry;
use actix::Addr;

/// Who is calling: the supplier behind a valid key, and the key's rate-limit decision.
struct Caller {
    supplier: usize,
    decision: Decision,
}

fn bearer_key(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The client's address as the failed-authentication limit counts it: the peer, or, when the
/// peer is a trusted load balancer, the right-most `X-Forwarded-For` entry that is not itself
/// a trusted proxy. IPv4 addresses written as IPv6 (`::ffff:10.0.0.7`, as a dual-stack listener
/// sees them) are read as IPv4, so `trusted_proxies` ranges match them; an IPv6 client counts
/// by its /64, the block one host is given, so walking through its addresses gains nothing.
fn client_address(req: &HttpRequest, trusted: &[ipnet::IpNet]) -> String {
    let Some(peer) = req.peer_addr().map(|a| a.ip().to_canonical()) else {
        return "unknown".into();
    };
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|net| net.contains(ip));
    let client = if is_trusted(&peer) {
        req.headers()
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find(|ip| !is_trusted(ip))
            .unwrap_or(peer)
    } else {
        peer
    };
    match client {
        std::net::IpAddr::V6(v6) => {
            let block = ipnet::Ipv6Net::new(v6, 64).map(|n| n.trunc());
            block.map_or_else(|_| v6.to_string(), |n| n.to_string())
        }
        v4 => v4.to_string(),
    }
}

// Failed authentication is limited per client address. A wrong key is counted and checked
// in one step, so guesses sent together get no more tries than the limit; a right key from
// an address over that limit is refused as a wrong one is, so a lucky guess cannot be told
// apart.

/// The key the failed-authentication limit counts the caller's address under.
fn auth_address_key(state: &AppState, req: &HttpRequest) -> String {
    format!("authfail:{}", client_address(req, &state.trusted_proxies))
}

/// A 429 for a caller with a right key whose address is over the failed-authentication limit.
async fn address_under_auth_limit(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let failures = state
        .limiter
        .peek(&auth_address_key(state, req), state.auth_failure_limit)
        .await;
    if !failures.allowed {
        counter!(telemetry::RATE_LIMITED_TOTAL).increment(1);
        return Err(ApiError::RateLimited {
            retry_after_secs: failures.retry_after_secs(),
        });
    }
    Ok(())
}

/// Counts a failed authentication against the caller's address: a 401, or a 429 when the
/// address is over its limit (that try is then not counted, as no refused request is).
async fn auth_failed(state: &AppState, req: &HttpRequest) -> ApiError {
    let failures = state
        .limiter
        .acquire(&auth_address_key(state, req), state.auth_failure_limit)
        .await;
    if !failures.allowed {
        counter!(telemetry::RATE_LIMITED_TOTAL).increment(1);
        return ApiError::RateLimited {
            retry_after_secs: failures.retry_after_secs(),
        };
    }
    counter!(telemetry::AUTH_FAILURES_TOTAL).increment(1);
    ApiError::InvalidApiKey
}

/// sha-256 of the bearer key (zeros without one, which no key hashes to).
fn bearer_hash(req: &HttpRequest) -> [u8; 32] {
    match bearer_key(req) {
        Some(key) => Sha256::digest(key.as_bytes()).into(),
        None => [0; 32],
    }
}

/// Checks an operator's bearer token (`[ops] token_sha256`), under the same limit of failed
/// authentications per address as suppliers' keys.
pub async fn authenticate_operator(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    if !state.ops_tokens.contains(&bearer_hash(req)) {
        return Err(auth_failed(state, req).await);
    }
    address_under_auth_limit(state, req).await
}

async fn authenticate(state: &AppState, req: &HttpRequest) -> Result<Caller, ApiError> {
    let hash = bearer_hash(req);
    let Some(&supplier) = state.keys.get(&hash) else {
        return Err(auth_failed(state, req).await);
    };
    address_under_auth_limit(state, req).await?;
    let started = std::time::Instant::now();
    let decision = state
        .limiter
        .acquire(
            &format!("key:{}", hex::encode(&hash[..16])),
            state.suppliers[supplier].limit,
        )
        .await;
    metrics::histogram!(telemetry::RATE_LIMIT_CHECK_DURATION)
        .record(started.elapsed().as_secs_f64());
    Ok(Caller { supplier, decision })
}

fn add_rate_headers(response: &mut HttpResponse, decision: &Decision) {
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-ratelimit-limit", decision.limit.to_string()),
        ("x-ratelimit-remaining", decision.remaining.to_string()),
        ("x-ratelimit-reset", decision.reset_secs().to_string()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(
                actix_web::http::header::HeaderName::from_static(name),
                value,
            );
        }
    }
}

/// Runs `inner` for an authenticated caller and puts the rate-limit headers on whatever it
/// answers, errors included.
async fn with_caller<F, Fut>(state: &AppState, req: &HttpRequest, inner: F) -> HttpResponse
where
    F: FnOnce(Caller) -> Fut,
    Fut: std::future::Future<Output = Result<HttpResponse, ApiError>>,
{
    let caller = match authenticate(state, req).await {
        Ok(caller) => caller,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    let decision = caller.decision;
    let mut response = if decision.allowed {
        inner(caller)
            .await
            .unwrap_or_else(|e| actix_web::ResponseError::error_response(&e))
    } else {
        counter!(telemetry::RATE_LIMITED_TOTAL).increment(1);
        actix_web::ResponseError::error_response(&ApiError::RateLimited {
            retry_after_secs: decision.retry_after_secs(),
        })
    };
    add_rate_headers(&mut response, &decision);
    response
}

/// A method the supplier API's routes do not take (`GET /api/leads`, `DELETE /api/leads/{id}`):
/// 405, after the key is checked and counted like any request to the API, so a valid key's
/// answer carries its rate-limit headers (CONTRACT §2) and a bad key is a 401 first.
pub async fn method_not_allowed(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    with_caller(&state, &req, |_| async { Err(ApiError::MethodNotAllowed) }).await
}

pub(crate) fn ok_json(body: String) -> HttpResponse {
    HttpResponse::build(StatusCode::OK)
        .insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")))
        .body(body)
}

/// Reads the body, refusing it as soon as it passes the limit (the rest is not buffered).
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<web::BytesMut, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES) {
        return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(1024).min(MAX_BODY_BYTES));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::InvalidBody(format!("The request body could not be read: {e}"))
        })?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn pairs_into(fields: &mut FieldMap, pairs: Vec<(String, String)>) {
    for (name, value) in pairs {
        fields.insert(name, Value::String(value));
    }
}

/// `name=value&...` pairs with `+` and `%XX` decoded, refused when a name or a value is not
/// UTF-8 once decoded (`firstName=Jos%E9`, Latin-1 from an old form): decoding it lossily
/// would pass buyers a name with a replacement character in it. A `%` not followed by two
/// hex digits is kept as written, as browsers do.
fn parse_urlencoded(input: &[u8]) -> Result<Vec<(String, String)>, String> {
    fn decode(part: &[u8]) -> Result<String, std::string::FromUtf8Error> {
        let hex = |b: u8| (b as char).to_digit(16);
        let mut out = Vec::with_capacity(part.len());
        let mut i = 0;
        while i < part.len() {
            match part[i] {
                b'+' => out.push(b' '),
                b'%' => match (
                    part.get(i + 1).and_then(|&b| hex(b)),
                    part.get(i + 2).and_then(|&b| hex(b)),
                ) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                },
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out)
    }
    let mut pairs = Vec::new();
    for pair in input.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(name)
            .map_err(|_| "has a field name that is not UTF-8 once decoded".to_owned())?;
        let value = decode(value)
            .map_err(|_| format!("has a value of {name} that is not UTF-8 once decoded"))?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Fields from the query string, then the body on top (the body wins on conflicts).
fn parse_fields(req: &HttpRequest, body: &[u8]) -> Result<FieldMap, ApiError> {
    let mut fields = FieldMap::default();
    let query = parse_urlencoded(req.query_string().as_bytes())
        .map_err(|e| ApiError::InvalidBody(format!("The query string {e}")))?;
    pairs_into(&mut fields, query);

    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let is_blank = body.iter().all(u8::is_ascii_whitespace);
    match content_type.as_deref() {
        _ if is_blank => {}
        Some("application/x-www-form-urlencoded") => {
            let form = parse_urlencoded(body)
                .map_err(|e| ApiError::InvalidBody(format!("The form body {e}")))?;
            pairs_into(&mut fields, form);
        }
        None => merge_json(&mut fields, body)?,
        Some(t)
            if t == "application/json"
                || (t.starts_with("application/") && t.ends_with("+json")) =>
        {
            merge_json(&mut fields, body)?
        }
        Some(other) => {
            return Err(ApiError::InvalidBody(format!(
                "Content-Type {other} is not supported; send application/json or application/x-www-form-urlencoded"
            )));
        }
    }
    Ok(fields)
}

/// The body's object straight into the lead's map (no `Value` tree of it first); when the
/// query string gave fields, the body's go on top of them.
fn merge_json(fields: &mut FieldMap, body: &[u8]) -> Result<(), ApiError> {
    let object: FieldMap = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::InvalidBody("The body must be a JSON object".into())
        } else {
            ApiError::InvalidBody(format!("The body is not valid JSON: {e}"))
        }
    })?;
    if fields.is_empty() {
        *fields = object;
    } else {
        fields.extend(object);
    }
    Ok(())
}

/// Seller by code (case-insensitive) or slug.
fn resolve_seller<'a>(state: &'a AppState, given: &str) -> Option<&'a String> {
    state
        .sellers_by_code
        .get(&given.to_ascii_uppercase())
        .or_else(|| state.sellers_by_slug.get(&given.to_ascii_lowercase()))
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::InvalidBody("Idempotency-Key must be visible ASCII".into()))?
        .trim();
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > 255 {
        return Err(ApiError::InvalidBody(
            "Idempotency-Key is longer than 255 characters".into(),
        ));
    }
    Ok(Some(key.to_owned()))
}

pub async fn submit(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    with_caller(&state, &req, |caller| {
        submit_lead(&state, &req, payload, caller)
    })
    .await
}

async fn submit_lead(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let supplier = &state.suppliers[caller.supplier];
    let idempotency = idempotency_key(req)?;
    let body = read_body(req, payload).await?;
    let prepared = prepare_lead(state, req, supplier, &body)?;
    let Some(key) = idempotency else {
        return run_auction(state, supplier, prepared, None).await;
    };
    // One request per (supplier, key) at a time: a concurrent repeat waits, then replays.
    let lock_key = format!("{}\u{1f}{key}", supplier.id);
    let lock = state
        .idempotency_locks
        .lock()
        .expect("idempotency locks")
        .entry(lock_key.clone())
        .or_default()
        .clone();
    let claim = Claim {
        guard: Some(lock.lock_owned().await),
        locks: state.idempotency_locks.clone(),
        key: lock_key,
    };
    let stored = state
        .store
        .get_idempotent(&supplier.id, &key, crate::clock::now_ms())
        .await
        .map_err(|e| ApiError::StorageUnavailable(e.to_string()))?;
    if let Some(answer) = stored {
        drop(claim);
        return replay(state, answer, &prepared.lead).await;
    }
    // Other nodes: the first to claim the key runs the auction, a repeat waits for its stored
    // answer.
    if let Some(shared) = &state.idempotency_across_nodes {
        let claim_key = format!("idem/{}/{key}", supplier.id);
        if let Some(answer) = shared
            .claim_or_wait(state, &supplier.id, &key, &claim_key)
            .await?
        {
            return replay(state, answer, &prepared.lead).await;
        }
        let answered = run_auction(state, supplier, prepared, Some((key, claim))).await;
        if answered.is_err()
            && let Err(e) = shared.coord.unclaim(std::slice::from_ref(&claim_key)).await
        {
            tracing::warn!(error = %e, "Idempotency-Key claim not given back; it expires by itself");
        }
        return answered;
    }
    run_auction(state, supplier, prepared, Some((key, claim))).await
}

/// The first answer again for a repeated Idempotency-Key, when the lead is the one that key
/// was first used for: the same seller, category and person (the fields the exchange knows,
/// normalised). The key on another person (a key reused by mistake) is refused rather than
/// answered with the first lead's id: that lead would be neither auctioned nor stored, and
/// the supplier would believe it sold. Fields the exchange does not know (a tracking
/// parameter, an attempt number) may differ between a request and its retry.
async fn replay(
    state: &AppState,
    answer: IdempotentAnswer,
    lead: &Lead,
) -> Result<HttpResponse, ApiError> {
    match state.store.get_lead_without_log(&answer.lead_id).await {
        Ok(Some(first)) if !same_lead(&first.fields, &lead.fields) => {
            return Err(ApiError::InvalidBody(format!(
                "Idempotency-Key was used for another lead ({}) within 24 h; a new lead needs a new key",
                answer.lead_id
            )));
        }
        Ok(_) => {}
        // The first answer stands without the check: a storage hiccup must not turn a retry
        // into an error the supplier answers by sending the lead again.
        Err(e) => {
            tracing::warn!(error = %e, lead_id = %answer.lead_id, "Idempotency-Key replayed without comparing the lead")
        }
    }
    counter!(telemetry::IDEMPOTENT_REPLAYS_TOTAL).increment(1);
    Ok(ok_json(answer.body))
}

/// Whether two leads' known fields, both normalised, hold the same values (seller and
/// category, matched without regard to case as they are for routing, as text).
fn same_lead(a: &FieldMap, b: &FieldMap) -> bool {
    use crate::domain::lead::{EMAIL, FIRST_NAME, LAST_NAME, PHONE, STATE, ZIP};
    let folded = |map: &FieldMap, name: &str| {
        text_value(map.get(name))
            .ok()
            .flatten()
            .map(|t| t.to_lowercase())
    };
    [SELLER, CATEGORY]
        .iter()
        .all(|name| folded(a, name) == folded(b, name))
        && [FIRST_NAME, LAST_NAME, PHONE, STATE, EMAIL, ZIP]
            .iter()
            .all(|name| a.get(*name) == b.get(*name))
}

/// Idempotency-Keys claimed in the shared coordinator, so two nodes receiving the same key at
/// once run one auction. The claim outlives the auction (its deadline twice, plus a margin):
/// the answer is stored by then, and a node that died mid-auction frees the key by expiry.
pub struct SharedIdempotency {
    pub coord: crate::coord::SharedCoordinator,
    /// How long a repeat waits for the first request's stored answer.
    wait: std::time::Duration,
    /// How long a claim holds the key.
    hold_ms: i64,
}

/// Between looks at the store while another node answers.
const IDEMPOTENCY_POLL: std::time::Duration = std::time::Duration::from_millis(25);

impl SharedIdempotency {
    /// `auction_deadline`: the longest answer of any campaign, its ping window plus a post to
    /// each of its buyers in turn.
    pub fn new(
        coord: crate::coord::SharedCoordinator,
        auction_deadline: std::time::Duration,
    ) -> SharedIdempotency {
        let wait = auction_deadline + std::time::Duration::from_secs(2);
        SharedIdempotency {
            coord,
            wait,
            hold_ms: (auction_deadline * 2 + std::time::Duration::from_secs(5)).as_millis() as i64,
        }
    }

    /// `Ok(None)` once this request holds the key; `Ok(Some(answer))` when another node's
    /// answer appeared in the store meanwhile. A key still held when the wait ends (its node
    /// is slow or gone, or stores are per node) is answered 503 with Retry-After: running a
    /// second auction could sell the lead twice.
    async fn claim_or_wait(
        &self,
        state: &AppState,
        supplier: &str,
        key: &str,
        claim_key: &str,
    ) -> Result<Option<IdempotentAnswer>, ApiError> {
        let give_up = tokio::time::Instant::now() + self.wait;
        loop {
            let now = crate::clock::now_ms();
            let claimed = self
                .coord
                .claim(&[claim_key.to_owned()], now, now + self.hold_ms)
                .await
                .map_err(|e| ApiError::StorageUnavailable(format!("Idempotency-Key claim: {e}")))?;
            if claimed {
                return Ok(None);
            }
            let stored = state
                .store
                .get_idempotent(supplier, key, crate::clock::now_ms())
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Some(answer) = stored {
                return Ok(Some(answer));
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(ApiError::Overloaded {
                    retry_after_secs: 1,
                });
            }
            tokio::time::sleep(IDEMPOTENCY_POLL).await;
        }
    }
}

/// A lead read, validated and routed: its campaign, the campaign's actor on this worker.
struct Prepared<'a> {
    campaign: &'a super::CampaignEntry,
    actor: &'a Addr<CampaignActor>,
    lead: Lead,
}

/// Fields, seller, campaign and field rules, in the contract's order of checks.
fn prepare_lead<'a>(
    state: &'a AppState,
    req: &'a HttpRequest,
    supplier: &super::SupplierEntry,
    body: &[u8],
) -> Result<Prepared<'a>, ApiError> {
    let fields = parse_fields(req, body)?;
    let seller = text_value(fields.get(SELLER)).ok().flatten();
    let category = text_value(fields.get(CATEGORY)).ok().flatten();
    let (Some(seller), Some(category)) = (seller, category) else {
        // Without seller or category there is no campaign: name every problem we can see.
        let errors = Lead::parse(fields, &[]).expect_err("seller or category is missing");
        return Err(field_error(errors));
    };
    let seller_code = match resolve_seller(state, &seller) {
        Some(code) if supplier.sellers.contains(code) => code.clone(),
        _ => {
            counter!(telemetry::AUTH_FAILURES_TOTAL).increment(1);
            return Err(ApiError::InvalidApiKey);
        }
    };
    let Some(campaign) = state.campaigns.get(&(seller_code, category.to_lowercase())) else {
        return Err(ApiError::NoMatchingCampaign);
    };
    // This worker's own actor for the campaign: the auction runs on the thread that
    // received the lead.
    let Some(actor) = req
        .app_data::<super::LocalCampaigns>()
        .and_then(|local| local.0.get(&campaign.id))
    else {
        return Err(ApiError::Internal(format!(
            "campaign {} has no actor on this worker",
            campaign.id
        )));
    };
    let lead = Lead::parse(fields, &campaign.required_fields).map_err(field_error)?;
    Ok(Prepared {
        campaign,
        actor,
        lead,
    })
}

/// The auction of a prepared lead, and its answer.
async fn run_auction(
    state: &AppState,
    supplier: &super::SupplierEntry,
    prepared: Prepared<'_>,
    idempotency: Option<(String, Claim)>,
) -> Result<HttpResponse, ApiError> {
    let Prepared {
        campaign,
        actor,
        lead,
    } = prepared;
    let Ok(_slot) = state.auctions.clone().try_acquire_owned() else {
        counter!(telemetry::OVERLOAD_REFUSALS_TOTAL).increment(1);
        return Err(ApiError::Overloaded {
            retry_after_secs: 1,
        });
    };
    let lead_id = state.new_lead_id();
    // One info line per lead ("auction done"); this one only at debug.
    tracing::debug!(lead_id = %lead_id, campaign = %campaign.id, supplier = %supplier.id, "lead accepted");
    let outcome = actor
        .send(RunAuction {
            lead_id,
            supplier_id: supplier.id.clone(),
            created_at_ms: crate::clock::now_ms(),
            lead: Arc::new(lead),
            idempotency_key: idempotency.as_ref().map(|(key, _)| key.clone()),
            hold: idempotency.map(|(_, claim)| Box::new(claim) as Box<dyn Send>),
            request_span: tracing::Span::current(),
        })
        .await
        // The campaign's mailbox closes only while the node stops: retry elsewhere.
        .map_err(|e| {
            tracing::warn!(campaign = %campaign.id, error = %e, "campaign not running");
            ApiError::Overloaded {
                retry_after_secs: 1,
            }
        })?;
    match outcome {
        Ok(record) => Ok(ok_json(dto::lead_answer(&record))),
        Err(AuctionError::Storage(e)) => Err(ApiError::StorageUnavailable(format!(
            "campaign {}: {e}",
            campaign.id
        ))),
        Err(AuctionError::Duplicate) => Err(ApiError::Duplicate),
        Err(AuctionError::Coordination(e)) => Err(ApiError::StorageUnavailable(format!(
            "campaign {}: {e}",
            campaign.id
        ))),
        Err(e) => Err(ApiError::Internal(format!("campaign {}: {e}", campaign.id))),
    }
}

/// This node's lock per (supplier, Idempotency-Key) in use.
pub type KeyLocks =
    Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// Holds an Idempotency-Key until dropped, and frees its lock entry then. It goes with the
/// lead into its auction (`RunAuction::hold`), so it outlives a request whose connection is
/// reset mid-auction: the auction runs on, and a repeat must wait for its stored answer.
struct Claim {
    locks: KeyLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            release_claim(&self.locks, &self.key, guard);
        }
    }
}

fn release_claim(locks: &KeyLocks, key: &str, guard: tokio::sync::OwnedMutexGuard<()>) {
    let mut locks = locks.lock().expect("idempotency locks");
    drop(guard);
    // Only the map holds it now: nobody else is waiting on this key.
    if locks
        .get(key)
        .is_some_and(|lock| Arc::strong_count(lock) == 1)
    {
        locks.remove(key);
    }
}

fn field_error(errors: crate::domain::FieldErrors) -> ApiError {
    if errors.missing.is_empty() {
        ApiError::InvalidFields(errors.invalid)
    } else {
        ApiError::MissingFields {
            missing: errors.missing,
            invalid: errors.invalid,
        }
    }
}

pub async fn status(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let lead_id = path.into_inner();
    let shared = state.clone();
    with_caller(&state, &req, move |caller| async move {
        let state = shared;
        let record = state
            .store
            .get_lead_without_log(&lead_id)
            .await
            .map_err(|e| ApiError::StorageUnavailable(e.to_string()))?;
        match record {
            Some(record) if record.supplier_id == state.suppliers[caller.supplier].id => {
                Ok(ok_json(dto::status_answer(&record)))
            }
            _ => Err(ApiError::NotFound),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<(), ApiError>) -> String {
        match result {
            Err(ApiError::InvalidBody(message)) => message,
            other => panic!("expected an invalid body, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_json_body_lands_on_the_query_fields_in_order_and_wins() {
        let mut fields = FieldMap::default();
        fields.insert("state".into(), Value::String("CA".into()));
        fields.insert("utm".into(), Value::String("q".into()));
        merge_json(
            &mut fields,
            br#"{"phone": "5551234567", "state": "TX", "age": 41}"#,
        )
        .unwrap();
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        assert_eq!(names, ["state", "utm", "phone", "age"]);
        assert_eq!(fields["state"], Value::String("TX".into()));
        assert_eq!(fields["age"], serde_json::json!(41));

        let mut alone = FieldMap::default();
        merge_json(&mut alone, br#"{"b": 1, "a": {"x": [1]}, "b": 2}"#).unwrap();
        assert_eq!(alone.keys().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(alone["b"], serde_json::json!(2));
        assert_eq!(alone["a"], serde_json::json!({"x": [1]}));
    }

    #[test]
    fn client_addresses_are_canonical_and_ipv6_counts_by_its_64() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let from = |peer: &str, forwarded: Option<&str>| {
            let mut req = actix_web::test::TestRequest::default().peer_addr(peer.parse().unwrap());
            if let Some(f) = forwarded {
                req = req.insert_header(("x-forwarded-for", f));
            }
            client_address(&req.to_http_request(), &trusted)
        };
        // A range written as IPv4-mapped IPv6 in the config is the IPv4 range it holds.
        let mapped = vec![crate::config::parse_proxy("::ffff:10.0.0.0/104").unwrap()];
        assert_eq!(mapped, vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]);
        let req = actix_web::test::TestRequest::default()
            .peer_addr("[::ffff:10.0.0.7]:40000".parse().unwrap())
            .insert_header(("x-forwarded-for", "203.0.113.9"))
            .to_http_request();
        assert_eq!(client_address(&req, &mapped), "203.0.113.9");
        // A load balancer's IPv4 address as a dual-stack listener sees it is still trusted.
        assert_eq!(
            from("[::ffff:10.0.0.7]:40000", Some("203.0.113.9")),
            "203.0.113.9"
        );
        assert_eq!(
            from("10.0.0.7:40000", Some("::ffff:203.0.113.9")),
            "203.0.113.9"
        );
        // Untrusted peers are themselves, their header ignored.
        assert_eq!(
            from("198.51.100.4:40000", Some("203.0.113.9")),
            "198.51.100.4"
        );
        // Addresses of one IPv6 /64 are one client.
        assert_eq!(from("[2001:db8:1:2::1]:40000", None), "2001:db8:1:2::/64");
        assert_eq!(
            from("[2001:db8:1:2:ffff:ab:cd:ef]:40000", None),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            from("10.1.2.3:40000", Some("2001:db8:9:9:1::5, 10.0.0.2")),
            "2001:db8:9:9::/64"
        );
    }

    #[test]
    fn url_encoding_is_decoded_and_text_that_is_not_utf8_once_decoded_is_refused() {
        let pairs = parse_urlencoded(
            b"firstName=Jos%C3%A9&city=San+Antonio&note=100%&empty=&flag&&a%3Db=%2B1",
        )
        .unwrap();
        let expected = [
            ("firstName", "José"),
            ("city", "San Antonio"),
            ("note", "100%"),
            ("empty", ""),
            ("flag", ""),
            ("a=b", "+1"),
        ];
        assert_eq!(pairs, expected.map(|(n, v)| (n.to_owned(), v.to_owned())));
        assert_eq!(
            parse_urlencoded(b"state=TX&firstName=Jos%E9").unwrap_err(),
            "has a value of firstName that is not UTF-8 once decoded"
        );
        assert_eq!(
            parse_urlencoded(b"city=\xff").unwrap_err(),
            "has a value of city that is not UTF-8 once decoded"
        );
        assert!(parse_urlencoded(b"na%FFme=1").is_err());
        assert!(parse_urlencoded(b"").unwrap().is_empty());
    }

    #[test]
    fn a_body_that_is_not_an_object_is_told_apart_from_broken_json() {
        for body in [&b"[1, 2]"[..], b"\"lead\"", b"null", b"42"] {
            let text = message(merge_json(&mut FieldMap::default(), body));
            assert_eq!(text, "The body must be a JSON object", "{body:?}");
        }
        for body in [&b"{\"seller\": "[..], b"{\"a\": 1} trailing", b"{'a': 1}"] {
            let text = message(merge_json(&mut FieldMap::default(), body));
            assert!(text.starts_with("The body is not valid JSON: "), "{text}");
        }
    }
}
