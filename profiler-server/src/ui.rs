//! Web UI: static front-end files embedded into the binary and served at `/`
//! (the page) and `/ui/<file>` (its ES modules and stylesheet).
//!
//! No CDN and no build step: the files under `profiler-server/ui/` are plain
//! ES modules and are compiled in with `include_str!`. Every reply carries a
//! content type, a strong `ETag` (hash of the content) and
//! `Cache-Control: no-cache`, so browsers revalidate cheaply (304) and never
//! run a stale UI against a newer server.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// (file name, content type, content)
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/app.js"),
    ),
    (
        "flame.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/flame.js"),
    ),
    (
        "timeline.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/timeline.js"),
    ),
    (
        "changes.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/changes.js"),
    ),
    (
        "waits.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/waits.js"),
    ),
    (
        "requests.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/requests.js"),
    ),
    (
        "deep.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/deep.js"),
    ),
    (
        "alerts.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/alerts.js"),
    ),
    (
        "overview.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/overview.js"),
    ),
    (
        "util.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/util.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../ui/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../ui/favicon.svg"),
    ),
];

/// Routes of the UI; merged into the API router (state-agnostic).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/favicon.ico", get(favicon))
        .route("/ui/{file}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn favicon(headers: HeaderMap) -> Response {
    serve("favicon.svg", &headers)
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

fn etag(content: &str) -> String {
    format!(
        "\"{:016x}\"",
        xxhash_rust::xxh3::xxh3_64(content.as_bytes())
    )
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(&(_, ctype, content)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        let error = serde_json::json!({ "error": format!("no such UI file: {name}") });
        return (StatusCode::NOT_FOUND, axum::Json(error)).into_response();
    };
    let tag = etag(content);
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::ETAG,
            HeaderValue::from_str(&tag).expect("hex etag is a valid header"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, HeaderValue::from_static(ctype))],
        content,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_type_and_the_page_links_them() {
        let page = ASSETS[0].2;
        for (name, ctype, content) in ASSETS {
            assert!(!content.is_empty(), "{name} is empty");
            assert!(!ctype.is_empty());
        }
        assert!(page.contains("/ui/app.js"));
        assert!(page.contains("/ui/style.css"));
    }

    #[test]
    fn etag_revalidation() {
        let r = serve("app.js", &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        let tag = r.headers()[header::ETAG].clone();
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript"));
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, tag);
        assert_eq!(serve("app.js", &h).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(
            serve("nope.js", &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
    }
}
