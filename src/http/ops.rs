//! Operators' routes: a stored lead as the exchange keeps it, auction log included, for the
//! question "what happened to this lead?" (the embedded store can be read no other way while
//! the node runs). Off unless `[ops] token_sha256` names a token.

use actix_web::{HttpRequest, HttpResponse, ResponseError, web};

use super::errors::ApiError;
use super::{AppState, dto, leads};

/// `GET /ops/leads/{lead_id}`: any supplier's lead, with its whole auction log and its fields
/// but the personal ones; 404 when the routes are off or the lead is unknown.
pub async fn lead(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let answer = async {
        if state.ops_tokens.is_empty() {
            return Err(ApiError::NotFound);
        }
        leads::authenticate_operator(&state, &req).await?;
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
    answer.await.unwrap_or_else(|e| e.error_response())
}
