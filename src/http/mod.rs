//! The HTTP edge (actix-web): routes, the request-id and metrics middleware, and the shared
//! state handlers read. Parsing happens here; everything below trusts the types.

pub mod dto;
pub mod errors;
pub mod leads;
pub mod ops;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::Addr;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use actix_web::{HttpMessage, HttpResponse, web};
use metrics::{counter, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tracing::Instrument;

pub use errors::ApiError;

use crate::actors::CampaignActor;
use crate::ratelimit::{Limit, SharedLimiter};
use crate::storage::LeadStore;
use crate::telemetry;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct SupplierEntry {
    pub id: String,
    /// Seller codes (upper-case) this supplier may submit to.
    pub sellers: HashSet<String>,
    pub limit: Limit,
}

pub struct CampaignEntry {
    pub id: String,
    pub required_fields: Vec<String>,
}

/// One HTTP worker's campaign actors by campaign id. Every worker starts its own set (see
/// `startup`), so an auction runs on the thread whose connection received the lead.
pub struct LocalCampaigns(pub HashMap<String, Addr<CampaignActor>>);

/// What every handler shares: lookups built from the config, the store, the limiter.
pub struct AppState {
    pub suppliers: Vec<SupplierEntry>,
    /// sha-256 of an API key -> index into `suppliers`.
    pub keys: HashMap<[u8; 32], usize>,
    /// Upper-case code -> code.
    pub sellers_by_code: HashMap<String, String>,
    /// Lower-case slug -> code.
    pub sellers_by_slug: HashMap<String, String>,
    /// (seller code, lower-case category) -> campaign.
    pub campaigns: HashMap<(String, String), CampaignEntry>,
    pub store: Arc<dyn LeadStore>,
    pub limiter: SharedLimiter,
    pub coord: crate::coord::SharedCoordinator,
    pub auth_failure_limit: Limit,
    pub auctions: Arc<Semaphore>,
    pub idempotency_locks: leads::KeyLocks,
    /// Set when several nodes share coordination: an Idempotency-Key is also claimed there.
    pub idempotency_across_nodes: Option<crate::http::leads::SharedIdempotency>,
    pub ids: Mutex<ulid::Generator>,
    pub metrics: PrometheusHandle,
    /// Peers whose `X-Forwarded-For` is believed (the load balancers).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// sha-256 of each operator token (`[ops] token_sha256`); empty: `/ops/` routes are off.
    pub ops_tokens: HashSet<[u8; 32]>,
    /// Campaign id -> the fields it keeps out of pings besides the standard personal ones.
    pub personal_fields: HashMap<String, Vec<String>>,
}

impl AppState {
    /// A new time-sortable lead id, monotonic within this node.
    pub fn new_lead_id(&self) -> String {
        let mut generator = self.ids.lock().expect("id generator");
        generator
            .generate()
            .unwrap_or_else(|_| ulid::Ulid::new())
            .to_string()
    }
}

/// The request id of the request being handled, also sent back in `X-Request-Id`.
#[derive(Clone)]
pub struct RequestId(pub String);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn request_id_from(req: &actix_web::dev::ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| ulid::Ulid::new().to_string())
}

fn json(status: actix_web::http::StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")))
        .body(body)
}

async fn healthz() -> HttpResponse {
    json(actix_web::http::StatusCode::OK, r#"{"status":"ok"}"#.into())
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let storage = state.store.ping().await.map_err(|e| e.to_string());
    let limiter = state.limiter.healthy().await;
    let coordination = state.coord.healthy().await;
    // Ready means storage and the rate-limit backend answer (CONTRACT §5). The shared
    // coordination backend (caps, dedupe, leases across nodes) is not part of that: without it
    // the node reports itself degraded, still ready.
    let ready = storage.is_ok() && limiter.is_ok();
    let body = serde_json::json!({
        "status": match (ready, coordination.is_ok()) {
            (false, _) => "unavailable",
            (true, false) => "degraded",
            (true, true) => "ready",
        },
        "storage": match &storage { Ok(()) => "ok".to_owned(), Err(e) => e.clone() },
        "rate_limit": match &limiter { Ok(()) => format!("ok ({})", state.limiter.backend()), Err(e) => e.clone() },
        "coordination": match &coordination { Ok(()) => format!("ok ({})", state.coord.backend()), Err(e) => e.clone() },
    });
    // A node whose shared limiter is down still answers the leads that reach it under
    // node-local limits (a load balancer that keeps unready nodes when none is ready sends
    // them); it does not claim to be ready.
    let status = if ready {
        actix_web::http::StatusCode::OK
    } else {
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body.to_string())
}

async fn metrics_page(state: web::Data<AppState>) -> HttpResponse {
    // Backend health is sampled per scrape, so alerts see an outage without polling /readyz.
    let storage_up = state.store.ping().await.is_ok();
    let limiter_up = state.limiter.healthy().await.is_ok();
    telemetry::record_backend_health(storage_up, state.limiter.backend(), limiter_up);
    let coordination_up = state.coord.healthy().await.is_ok();
    telemetry::record_coordination_health(state.coord.backend(), coordination_up);
    let mut body = state.metrics.render();
    body.push('\n');
    body.push_str(&telemetry::render_process_metrics());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}

/// The supplier API's OpenAPI 3.1 document, kept in the repository and checked against real
/// answers by the tests.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")))
        .body(OPENAPI)
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// Registers every route, the middleware and the JSON 404/405 answers.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/leads")
            .route(web::post().to(leads::submit))
            .default_service(web::to(leads::method_not_allowed)),
    )
    .service(
        web::resource("/api/leads/{lead_id}")
            .route(web::get().to(leads::status))
            .default_service(web::to(leads::method_not_allowed)),
    )
    .service(
        web::resource("/api/openapi.json")
            .route(web::get().to(openapi))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/healthz")
            .route(web::get().to(healthz))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/readyz")
            .route(web::get().to(readyz))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/ops/leads/{lead_id}")
            .route(web::get().to(ops::lead))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/ops/suppliers/{supplier_id}/leads")
            .route(web::get().to(ops::supplier_leads))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics_page))
            .default_service(web::to(method_not_allowed)),
    );
}

/// A route's request duration histogram and request counter for one status.
type HttpSeries = (metrics::Histogram, metrics::Counter);

thread_local! {
    /// Each worker's handles on the request series it has seen, by route pattern and status.
    static HTTP_SERIES: std::cell::RefCell<HashMap<(Option<String>, u16), HttpSeries>> =
        std::cell::RefCell::default();
}

/// The request duration histogram and request counter of `route` (a pattern; `unmatched`
/// when none matched) and `status`, looked up once per worker.
fn http_series(route: Option<String>, status: u16) -> HttpSeries {
    HTTP_SERIES.with(|series| {
        series
            .borrow_mut()
            .entry((route, status))
            .or_insert_with_key(|(route, status)| {
                let route = route.clone().unwrap_or_else(|| "unmatched".to_owned());
                let status = status.to_string();
                (
                    histogram!(telemetry::HTTP_REQUEST_DURATION, "route" => route.clone(), "status" => status.clone()),
                    counter!(telemetry::HTTP_REQUESTS_TOTAL, "route" => route, "status" => status),
                )
            })
            .clone()
    })
}

/// Builds the actix-web app with its middleware around `configure`.
pub fn app(
    state: web::Data<AppState>,
    campaigns: LocalCampaigns,
) -> actix_web::App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = ServiceResponse<actix_web::body::BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    actix_web::App::new()
        .app_data(state)
        .app_data(campaigns)
        .configure(configure)
        .default_service(web::to(not_found))
        .wrap_fn(|req, srv| {
            let request_id = request_id_from(&req);
            req.extensions_mut().insert(RequestId(request_id.clone()));
            let span = tracing::info_span!(
                "request",
                request_id = %request_id,
                method = %req.method(),
                path = %req.path(),
                lead_id = tracing::field::Empty,
                campaign = tracing::field::Empty,
            );
            let started = Instant::now();
            let call = {
                let _entered = span.enter();
                srv.call(req)
            };
            async move {
                let mut res: ServiceResponse = call.await?;
                if let Ok(value) = HeaderValue::from_str(&request_id) {
                    res.headers_mut().insert(REQUEST_ID, value);
                }
                let route = res.request().match_pattern();
                let status = res.status().as_u16();
                let elapsed = started.elapsed().as_secs_f64();
                let (duration, total) = http_series(route, status);
                duration.record(elapsed);
                total.increment(1);
                tracing::debug!(status, elapsed_ms = elapsed * 1000.0, "answered");
                Ok(res)
            }
            .instrument(span)
        })
}
