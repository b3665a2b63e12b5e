//! Who a request is and whether it may run: the access token (`X-Access-Token`, once `/init`
//! set one), the user (HTTP Basic with an empty password; envd's default user otherwise), and
//! paths resolved against that user's home or the default workdir.
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use connectrpc::ConnectError;
use http::{HeaderMap, Method, StatusCode};

use crate::http::json_error;
use crate::state::Shared;
use crate::users::User;

/// The header carrying the access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// Requests that pass without the token (E2B's list): the health probe, `/init` (the host
/// sets the token with it), and `/files`, which checks the token or a URL signature itself.
fn exempt(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), path),
        ("GET", "/health") | ("GET", "/files") | ("POST", "/files") | ("POST", "/init")
    ) || method == Method::OPTIONS
}

/// Middleware: once a token is set, every non-exempt request must carry it.
pub async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if exempt(request.method(), request.uri().path()) || token_matches(&shared, request.headers()) {
        return next.run(request).await;
    }
    json_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized access, please provide a valid access token or method signing if supported",
    )
    .into_response()
}

/// Whether `headers` carry the token (true when none is set).
pub fn token_matches(shared: &Shared, headers: &HeaderMap) -> bool {
    let given = headers.get(ACCESS_TOKEN_HEADER);
    shared.read(|s| match &s.access_token {
        None => true,
        Some(expected) => {
            given.is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes()))
        }
    })
}

/// Compares without an early exit, so timing does not reveal the matching prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The user named by an `Authorization: Basic base64("<user>:")` header, if any.
pub fn basic_user(headers: &HeaderMap) -> Result<Option<String>, ConnectError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let invalid =
        || ConnectError::unauthenticated("invalid Authorization header: want Basic <base64 user:>");
    let value = value.to_str().map_err(|_| invalid())?;
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Err(invalid());
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| invalid())?;
    let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
    let name = decoded
        .split_once(':')
        .map_or(decoded.as_str(), |(name, _)| name);
    Ok((!name.is_empty()).then(|| name.to_owned()))
}

/// The user an RPC runs as: the Basic header's, else envd's default user.
pub fn rpc_user(shared: &Shared, headers: &HeaderMap) -> Result<User, ConnectError> {
    let name = match basic_user(headers)? {
        Some(name) => name,
        None => shared.read(|s| s.default_user.clone()),
    };
    lookup_user(shared, &name)
}

/// The user called `name`, as a Connect error when there is none.
pub fn lookup_user(shared: &Shared, name: &str) -> Result<User, ConnectError> {
    shared.users.lookup(name).map_err(|error| match error {
        crate::users::UserError::UnknownUser(_) => ConnectError::unauthenticated(error.to_string()),
        crate::users::UserError::Read { .. } => ConnectError::internal(error.to_string()),
    })
}

/// Resolves a path the way E2B's envd does: `~` and `~/x` are the user's home, a relative
/// path starts at the default workdir (if set) or the home; `.` and `..` are folded lexically
/// so that errors name a clean path. An empty path is the start directory itself.
pub fn resolve_path(path: &str, user: &User, default_workdir: Option<&Path>) -> PathBuf {
    let start = default_workdir.map_or_else(|| user.home.clone(), Path::to_path_buf);
    let joined = if path == "~" {
        user.home.clone()
    } else if let Some(rest) = path.strip_prefix("~/") {
        user.home.join(rest)
    } else if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        start.join(path)
    };
    normalize(&joined)
}

/// `a/./b/../c` → `a/c`, without touching the filesystem (`..` at the root stays at the root).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/user".into(),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        }
    }

    #[test]
    fn paths_resolve_like_envd() {
        let u = user();
        assert_eq!(
            resolve_path("a.txt", &u, None),
            PathBuf::from("/home/user/a.txt")
        );
        assert_eq!(
            resolve_path("~/x/../y", &u, None),
            PathBuf::from("/home/user/y")
        );
        assert_eq!(resolve_path("~", &u, None), PathBuf::from("/home/user"));
        assert_eq!(resolve_path("/tmp/./z", &u, None), PathBuf::from("/tmp/z"));
        assert_eq!(resolve_path("../../..", &u, None), PathBuf::from("/"));
        assert_eq!(
            resolve_path("w", &u, Some(Path::new("/work"))),
            PathBuf::from("/work/w")
        );
        assert_eq!(resolve_path("", &u, None), PathBuf::from("/home/user"));
    }

    #[test]
    fn basic_header_names_the_user() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_user(&headers).unwrap(), None);
        headers.insert("authorization", HeaderValue::from_static("Basic dXNlcjo=")); // "user:"
        assert_eq!(basic_user(&headers).unwrap().as_deref(), Some("user"));
        headers.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(
            basic_user(&headers).unwrap_err().code,
            connectrpc::ErrorCode::Unauthenticated
        );
        headers.insert("authorization", HeaderValue::from_static("Basic !!!"));
        assert!(basic_user(&headers).is_err());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
