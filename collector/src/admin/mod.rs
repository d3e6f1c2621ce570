//! The admin API on `[admin] listen`: JSON over HTTP/1.1, bearer token,
//! DESIGN.md's "Admin API contract" (documented in `docs/admin.md`,
//! described by `docs/openapi.json`, which is also served at
//! `GET /api/v1/openapi.json`).
//!
//! - this file: the server, authentication, routing, errors;
//! - `input`: reading and checking JSON bodies and query strings;
//! - `resources`: each endpoint's SQL, writing PostgreSQL first and then
//!   propagating the change to Redis (`crate::propagate`);
//! - `slug`: generated slugs.
//!
//! Errors are `{"error": "...", "field": "..."|null}` with 400 (not JSON),
//! 401 (token), 404, 405, 409 (already taken), 413 (body over 64 KiB),
//! 422 (a field's value) and 503 (PostgreSQL unavailable). Bad input is
//! never a 5xx.

pub mod input;
pub mod resources;
pub mod slug;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::propagate::Propagator;

/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// The OpenAPI description of this API, kept in the repository.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, field: Option<&str>) -> ApiError {
        ApiError {
            status,
            error: error.to_string(),
            field: field.map(str::to_string),
        }
    }

    /// 422: a field's value is not acceptable.
    pub fn invalid(field: &str, error: &str) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, error, Some(field))
    }

    pub fn bad_request(error: &str) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, error, None)
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, &format!("{what} not found"), None)
    }

    pub fn conflict(field: &str, error: &str) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, error, Some(field))
    }

    fn body(&self) -> String {
        serde_json::json!({"error": self.error, "field": self.field}).to_string()
    }
}

impl From<sqlx::Error> for ApiError {
    /// Constraint violations name their column (PostgreSQL's default
    /// constraint names are `{table}_{column}_{kind}`); anything else is
    /// the database's trouble, not the request's: 503.
    fn from(e: sqlx::Error) -> ApiError {
        if let sqlx::Error::Database(db) = &e {
            let field = db.constraint().map(constraint_field).unwrap_or_default();
            match db.code().as_deref() {
                Some("23505") => return ApiError::conflict(&field, "already taken"),
                Some("23503") => return ApiError::invalid(&field, "does not exist"),
                Some("23514") | Some("23502") => {
                    return ApiError::invalid(&field, "not acceptable");
                }
                Some(c) if c.starts_with("22") => {
                    return ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &format!("value out of range: {}", db.message()),
                        None,
                    );
                }
                _ => {}
            }
        }
        tracing::warn!(error = %e, "admin request failed in postgres");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database unavailable, try again",
            None,
        )
    }
}

/// `links_slug_key` -> `slug`, `offers_network_id_fkey` -> `network_id`.
fn constraint_field(c: &str) -> String {
    let rest = c.split_once('_').map_or(c, |(_, r)| r);
    ["_key", "_fkey", "_check", "_not_null"]
        .iter()
        .find_map(|suffix| rest.strip_suffix(suffix))
        .unwrap_or(rest)
        .to_string()
}

/// What every handler needs.
#[derive(Debug)]
pub struct Admin {
    pub pool: PgPool,
    pub token: String,
    pub propagator: Arc<Propagator>,
}

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Constant-time check of `Authorization: Bearer <token>`.
fn authorized(req: &Request<hyper::body::Incoming>, token: &str) -> bool {
    // The scheme name is case-insensitive (RFC 9110 section 11.1).
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| &v[7..])
    else {
        return false;
    };
    // Hash both sides so the comparison is over equal lengths and its
    // time does not depend on where they differ.
    let a = blake3::hash(given);
    let b = blake3::hash(token.as_bytes());
    a == b // blake3::Hash's PartialEq is constant-time.
}

async fn handle(admin: Arc<Admin>, req: Request<hyper::body::Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/healthz" {
        return json(StatusCode::OK, "{\"status\":\"ok\"}".into());
    }
    if path == "/api/v1/openapi.json" && method == Method::GET {
        return json(StatusCode::OK, OPENAPI.to_string());
    }
    let result = async {
        if !authorized(&req, &admin.token) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
                None,
            ));
        }
        let query = req.uri().query().map(str::to_string);
        let body = read_body(req).await?;
        let segments: Vec<&str> = path
            .strip_prefix("/api/v1/")
            .map(|p| p.trim_end_matches('/').split('/').collect())
            .unwrap_or_default();
        resources::route(&admin, &method, &segments, query.as_deref(), body).await
    }
    .await;
    match result {
        Ok((status, body)) => json(status, body),
        Err(e) => {
            let mut r = json(e.status, e.body());
            if e.status == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            r
        }
    }
}

/// The body as JSON, or `None` when empty.
async fn read_body(
    req: Request<hyper::body::Incoming>,
) -> Result<Option<serde_json::Value>, ApiError> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body larger than {MAX_BODY} bytes (or unreadable)"),
                None,
            ));
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::bad_request(&format!("body is not JSON: {e}")))
}

/// Serve until shutdown.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let admin = admin.clone();
        let svc = hyper::service::service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(handle(admin, req).await) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_names_give_fields() {
        assert_eq!(constraint_field("links_slug_key"), "slug");
        assert_eq!(constraint_field("offers_network_id_fkey"), "network_id");
        assert_eq!(
            constraint_field("networks_postback_token_key"),
            "postback_token"
        );
        assert_eq!(constraint_field("offers_payout_check"), "payout");
    }

    #[test]
    fn error_bodies_name_the_field() {
        let e = ApiError::invalid("payout", "is required");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["field"], "payout");
        assert_eq!(v["error"], "is required");
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::bad_request("x").body()).unwrap();
        assert!(v["field"].is_null());
    }
}
