//! `ApiError`: the only place that maps failures to status codes and the contract's error
//! body `{"success": false, "error", "message"[, "fields"]}`.

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API key missing or invalid")]
    InvalidApiKey,
    #[error("too many requests")]
    RateLimited { retry_after_secs: i64 },
    #[error("{0}")]
    InvalidBody(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("no matching campaign")]
    NoMatchingCampaign,
    #[error("missing required field")]
    MissingFields {
        missing: Vec<String>,
        invalid: Vec<String>,
    },
    #[error("invalid field")]
    InvalidFields(Vec<String>),
    #[error("duplicate lead")]
    Duplicate,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("busy")]
    Overloaded { retry_after_secs: i64 },
    /// The outcome could not be stored: nothing is answered as sold without a record.
    #[error("storage unavailable: {0}")]
    StorageUnavailable(String),
    /// The cause is logged with the request id; the supplier sees nothing of it.
    #[error("internal: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    success: bool,
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<Vec<String>>,
}

impl ApiError {
    /// The contract's error name.
    pub fn name(&self) -> &'static str {
        match self {
            ApiError::InvalidApiKey => "Invalid API Key",
            ApiError::RateLimited { .. } => "Rate limit exceeded",
            ApiError::InvalidBody(_) => "Invalid request body",
            ApiError::PayloadTooLarge(_) => "Payload too large",
            ApiError::NoMatchingCampaign => "No matching campaign",
            ApiError::MissingFields { .. } => "Missing required field",
            ApiError::InvalidFields(_) => "Invalid field",
            ApiError::Duplicate => "Duplicate lead",
            ApiError::NotFound => "Not found",
            ApiError::MethodNotAllowed => "Method not allowed",
            ApiError::Overloaded { .. } | ApiError::StorageUnavailable(_) => "Internal error",
            ApiError::Internal(_) => "Internal error",
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::InvalidApiKey => "API key missing or invalid".into(),
            ApiError::RateLimited { retry_after_secs } => {
                format!("Too many requests, slow down; retry in {retry_after_secs} s")
            }
            ApiError::InvalidBody(why) => why.clone(),
            ApiError::PayloadTooLarge(max) => format!("Request body is larger than {max} bytes"),
            ApiError::NoMatchingCampaign => "Category doesn't match any active campaign".into(),
            ApiError::MissingFields { missing, invalid } if invalid.is_empty() => {
                format!("Missing required field: {}", missing.join(", "))
            }
            ApiError::MissingFields { missing, invalid } => format!(
                "Missing required field: {}; invalid field: {}",
                missing.join(", "),
                invalid.join(", ")
            ),
            ApiError::InvalidFields(fields) => format!("Invalid field: {}", fields.join(", ")),
            ApiError::Duplicate => "This lead was already submitted to the campaign".into(),
            ApiError::NotFound => "Not found".into(),
            ApiError::MethodNotAllowed => "Method not allowed".into(),
            ApiError::Overloaded { .. } => "The exchange is at capacity, retry shortly".into(),
            ApiError::StorageUnavailable(_) => {
                "The lead could not be recorded, retry shortly".into()
            }
            ApiError::Internal(_) => "Server error, contact support".into(),
        }
    }

    fn fields(&self) -> Option<Vec<String>> {
        match self {
            ApiError::MissingFields { missing, invalid } => {
                Some(missing.iter().chain(invalid.iter()).cloned().collect())
            }
            ApiError::InvalidFields(fields) => Some(fields.clone()),
            _ => None,
        }
    }

    pub fn body(&self) -> String {
        serde_json::to_string(&ErrorBody {
            success: false,
            error: self.name(),
            message: self.message(),
            fields: self.fields(),
        })
        .expect("error bodies always serialise")
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InvalidBody(_)
            | ApiError::NoMatchingCampaign
            | ApiError::MissingFields { .. }
            | ApiError::InvalidFields(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Duplicate => StatusCode::CONFLICT,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Overloaded { .. } | ApiError::StorageUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) | ApiError::StorageUnavailable(cause) = self {
            tracing::error!(cause = %cause, "internal error");
        }
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")));
        match self {
            ApiError::RateLimited { retry_after_secs }
            | ApiError::Overloaded { retry_after_secs } => {
                response.insert_header((RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::StorageUnavailable(_) => {
                response.insert_header((RETRY_AFTER, "5"));
            }
            _ => {}
        }
        response.body(self.body())
    }
}
