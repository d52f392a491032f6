//! Who may do what. Three scopes, each with its own tokens:
//! - ingest (`tokens`): agents and SDKs push profiles and poll their runs;
//! - admin (`admin_tokens`): schedules and runs, which change how every agent
//!   samples, so a token that sits on every host cannot do it;
//! - read (`read_tokens`, optional): queries, the UI's data and `/metrics`.
//!
//! An admin token is also good for ingest and reads. With no tokens at all the
//! server is open, which `start` allows only on a loopback address (or with
//! `insecure`). Browsers are kept out of writes from other sites (`Origin`,
//! `Sec-Fetch-Site`), and on loopback a `Host` that is not a loopback name is
//! refused, so a web page cannot reach the server by DNS rebinding.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::http::{ApiError, AppState};
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Ingest,
    Admin,
    Read,
}

pub async fn ingest(State(s): State<AppState>, req: Request, next: Next) -> Response {
    guard(&s.config, Scope::Ingest, req, next).await
}

pub async fn admin(State(s): State<AppState>, req: Request, next: Next) -> Response {
    guard(&s.config, Scope::Admin, req, next).await
}

pub async fn read(State(s): State<AppState>, req: Request, next: Next) -> Response {
    guard(&s.config, Scope::Read, req, next).await
}

async fn guard(cfg: &Config, scope: Scope, req: Request, next: Next) -> Response {
    match check(cfg, scope, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) if is_grpc(req.headers()) => grpc_refusal(&e),
        Err(e) => e.into_response(),
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A refusal as gRPC clients read it: HTTP 200 with the status in
/// `grpc-status` (16 unauthenticated, 7 permission denied).
fn grpc_refusal(e: &ApiError) -> Response {
    let code = if e.status() == StatusCode::UNAUTHORIZED { "16" } else { "7" };
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", header::HeaderValue::from_static(code));
    if let Ok(message) = header::HeaderValue::from_str(e.message()) {
        h.insert("grpc-message", message);
    }
    resp
}

pub fn check(cfg: &Config, scope: Scope, headers: &HeaderMap) -> Result<(), ApiError> {
    let accepted: Vec<&String> = match scope {
        Scope::Ingest => cfg.tokens.iter().chain(&cfg.admin_tokens).collect(),
        Scope::Admin => cfg.admin_tokens.iter().collect(),
        Scope::Read => cfg.read_tokens.iter().chain(&cfg.admin_tokens).collect(),
    };
    let open = match scope {
        Scope::Ingest | Scope::Admin => cfg.tokens.is_empty() && cfg.admin_tokens.is_empty(),
        Scope::Read => cfg.read_tokens.is_empty(),
    };
    if open {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <token>` header",
        ));
    };
    let known = |set: &[String]| set.iter().any(|k| constant_time_eq(k.as_bytes(), token.as_bytes()));
    if accepted.iter().any(|k| constant_time_eq(k.as_bytes(), token.as_bytes())) {
        return Ok(());
    }
    if known(&cfg.tokens) || known(&cfg.read_tokens) {
        let why = match scope {
            Scope::Admin if cfg.admin_tokens.is_empty() => {
                "changing schedules, runs and alert rules needs an admin token, and none is configured (`admin_tokens`)"
            }
            Scope::Admin => "changing schedules, runs and alert rules needs an admin token",
            Scope::Ingest => "this token may read but not ingest",
            Scope::Read => "this token may ingest but not read",
        };
        return Err(ApiError::new(StatusCode::FORBIDDEN, why));
    }
    Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid bearer token"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses writes a browser sends on behalf of another site, and any request
/// to a loopback listener that names a host other than loopback.
pub async fn same_origin(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match check_origin(&s.config, req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn check_origin(cfg: &Config, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST);
    if cfg.listen.ip().is_loopback() {
        if let Some(host) = host {
            if !is_loopback_name(host) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("Host {host:?} is not a loopback name; this server listens on loopback only"),
                ));
            }
        }
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if headers.get("sec-fetch-site").is_some_and(|v| v == "cross-site") {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "cross-site writes are refused"));
    }
    if let (Some(origin), Some(host)) = (text(header::ORIGIN), host) {
        let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if !authority.eq_ignore_ascii_case(host) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("writes from origin {origin:?} to host {host:?} are refused"),
            ));
        }
    }
    Ok(())
}

fn is_loopback_name(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tokens: &[&str], admin: &[&str], read: &[&str]) -> Config {
        let v = |t: &[&str]| t.iter().map(|s| s.to_string()).collect();
        Config { tokens: v(tokens), admin_tokens: v(admin), read_tokens: v(read), ..Config::default() }
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        h
    }

    fn status(r: Result<(), ApiError>) -> u16 {
        r.map_or_else(|e| e.status().as_u16(), |()| 200)
    }

    #[test]
    fn scopes_keep_agents_out_of_admin_and_reads_optional() {
        let c = cfg(&["agent"], &["boss"], &[]);
        assert_eq!(status(check(&c, Scope::Ingest, &bearer("agent"))), 200);
        assert_eq!(status(check(&c, Scope::Ingest, &bearer("boss"))), 200);
        assert_eq!(status(check(&c, Scope::Admin, &bearer("agent"))), 403);
        assert_eq!(status(check(&c, Scope::Admin, &bearer("boss"))), 200);
        assert_eq!(status(check(&c, Scope::Admin, &bearer("nope"))), 401);
        assert_eq!(status(check(&c, Scope::Admin, &HeaderMap::new())), 401);
        assert_eq!(status(check(&c, Scope::Read, &HeaderMap::new())), 200, "reads open without read tokens");

        let c = cfg(&["agent"], &[], &["viewer"]);
        assert_eq!(status(check(&c, Scope::Admin, &bearer("agent"))), 403, "no admin token configured");
        assert_eq!(status(check(&c, Scope::Read, &bearer("viewer"))), 200);
        assert_eq!(status(check(&c, Scope::Read, &bearer("agent"))), 403);
        assert_eq!(status(check(&c, Scope::Ingest, &bearer("viewer"))), 403);
        assert_eq!(status(check(&c, Scope::Read, &HeaderMap::new())), 401);

        let open = cfg(&[], &[], &[]);
        for scope in [Scope::Ingest, Scope::Admin, Scope::Read] {
            assert_eq!(status(check(&open, scope, &HeaderMap::new())), 200);
        }
    }

    #[test]
    fn cross_site_writes_and_foreign_hosts_are_refused() {
        let c = Config::default();
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            m
        };
        let post = Method::POST;
        assert!(check_origin(&c, &post, &h(&[("host", "127.0.0.1:4040")])).is_ok());
        assert!(check_origin(&c, &post, &h(&[("host", "localhost:4040"), ("origin", "http://localhost:4040")])).is_ok());
        assert!(check_origin(&c, &post, &h(&[("host", "127.0.0.1:4040"), ("origin", "https://evil.example")])).is_err());
        assert!(check_origin(&c, &post, &h(&[("host", "127.0.0.1:4040"), ("sec-fetch-site", "cross-site")])).is_err());
        assert!(check_origin(&c, &Method::GET, &h(&[("host", "evil.example")])).is_err(), "DNS rebinding");
        assert!(check_origin(&c, &Method::GET, &h(&[("host", "[::1]:4040")])).is_ok());
        let public = Config { listen: "0.0.0.0:4040".parse().unwrap(), ..Config::default() };
        assert!(check_origin(&public, &Method::GET, &h(&[("host", "profiler.example:4040")])).is_ok());
    }
}
