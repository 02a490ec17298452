//! Operators' routes: a stored lead as the exchange keeps it, auction log included, for the
//! question "what happened to this lead?", and a supplier's leads of a day for reporting (the
//! embedded store can be read no other way while the node runs). Off unless `[ops]
//! token_sha256` names a token.

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, ResponseError, web};

use super::errors::ApiError;
use super::{AppState, dto, leads};

/// Answers an operator's request with `inner`'s answer, or its error: a 404 while the routes
/// are off, a 401 (or 429) for a bad token.
async fn for_operator<F>(state: &AppState, req: &HttpRequest, inner: F) -> HttpResponse
where
    F: std::future::Future<Output = Result<HttpResponse, ApiError>>,
{
    let answer = async {
        if state.ops_tokens.is_empty() {
            return Err(ApiError::NotFound);
        }
        leads::authenticate_operator(state, req).await?;
        inner.await
    };
    answer.await.unwrap_or_else(|e| e.error_response())
}

/// `GET /ops/leads/{lead_id}`: any supplier's lead, with its whole auction log and its fields
/// but the personal ones; 404 when the routes are off or the lead is unknown.
pub async fn lead(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let answer = async {
        let record = state
            .store
            .get_lead(&path)
            .await
            .map_err(|e| ApiError::StorageUnavailable(e.to_string()))?
            .ok_or(ApiError::NotFound)?;
        let personal = state
            .personal_fields
            .get(&record.campaign_id)
            .map_or(&[][..], Vec::as_slice);
        Ok(leads::ok_json(dto::operator_view(&record, personal)))
    };
    for_operator(&state, &req, answer).await
}

/// Most leads one page of `supplier_leads` lists; 100 when not asked.
pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

/// `GET /ops/suppliers/{supplier_id}/leads?day=YYYY-MM-DD[&after=LEAD_ID][&limit=N]`: a
/// supplier's leads created on a UTC day, oldest first, a page at a time (`next_after` names
/// the last lead of a full page, to pass as `after`).
pub async fn supplier_leads(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let answer = async {
        let supplier = path.into_inner();
        if !state.suppliers.iter().any(|s| s.id == supplier) {
            return Err(ApiError::NotFound);
        }
        let page = Page::read(&query)?;
        let records = state
            .store
            .leads_of_supplier_day(&supplier, page.day, page.after, page.limit)
            .await
            .map_err(|e| ApiError::StorageUnavailable(e.to_string()))?;
        let full = records.len() == page.limit;
        Ok(leads::ok_json(dto::operator_day(
            &supplier, page.date, &records, full,
        )))
    };
    for_operator(&state, &req, answer).await
}

/// The query of `supplier_leads`, checked.
struct Page<'a> {
    date: &'a str,
    /// Days since 1970-01-01.
    day: i64,
    after: Option<&'a str>,
    limit: usize,
}

impl<'a> Page<'a> {
    fn read(query: &'a HashMap<String, String>) -> Result<Page<'a>, ApiError> {
        let Some(date) = query.get("day").map(|d| d.trim()) else {
            return Err(ApiError::MissingFields {
                missing: vec!["day".into()],
                invalid: Vec::new(),
            });
        };
        let mut invalid = Vec::new();
        let day = date
            .parse::<jiff::civil::Date>()
            .ok()
            .and_then(|d| d.since(jiff::civil::date(1970, 1, 1)).ok())
            .map(|span| i64::from(span.get_days()));
        if day.is_none() {
            invalid.push("day".to_owned());
        }
        let limit = match query.get("limit") {
            None => Some(DEFAULT_PAGE),
            Some(n) => n.trim().parse().ok().filter(|n| (1..=MAX_PAGE).contains(n)),
        };
        if limit.is_none() {
            invalid.push("limit".to_owned());
        }
        match (day, limit) {
            (Some(day), Some(limit)) => Ok(Page {
                date,
                day,
                after: query
                    .get("after")
                    .map(String::as_str)
                    .filter(|a| !a.is_empty()),
                limit,
            }),
            _ => Err(ApiError::InvalidFields(invalid)),
        }
    }
}
