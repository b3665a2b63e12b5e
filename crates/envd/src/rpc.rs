//! Shared pieces of the Connect services: errors from I/O failures, and the stream headers
//! E2B's SDKs send (`Keepalive-Ping-Interval`).
use std::io;
use std::path::Path;
use std::time::Duration;

use connectrpc::ConnectError;
use http::HeaderMap;

/// The keep-alive interval when the client names none (E2B's envd: 90 s).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// How often a stream with nothing to say sends a keep-alive event: the client's
/// `Keepalive-Ping-Interval` (seconds), else [`DEFAULT_KEEPALIVE`].
pub fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .filter(|&seconds| seconds > 0)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs)
}

/// The Connect error for a failed filesystem operation on `path`, with the codes the SDKs map:
/// missing → `not_found`, exists → `already_exists`, refused → `permission_denied`, a
/// wrong file kind → `invalid_argument`, a full disk → `resource_exhausted`, else `internal`.
pub fn io_error(what: &str, path: &Path, error: &io::Error) -> ConnectError {
    let path = path.display();
    match error.kind() {
        io::ErrorKind::NotFound => {
            ConnectError::not_found(format!("{what}: path '{path}' does not exist"))
        }
        io::ErrorKind::AlreadyExists => {
            ConnectError::already_exists(format!("{what}: path '{path}' already exists"))
        }
        io::ErrorKind::PermissionDenied => {
            ConnectError::permission_denied(format!("{what}: permission denied for '{path}'"))
        }
        io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory
        | io::ErrorKind::InvalidInput => {
            ConnectError::invalid_argument(format!("{what} '{path}': {error}"))
        }
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            ConnectError::resource_exhausted(format!("{what} '{path}': {error}"))
        }
        _ => ConnectError::internal(format!("{what} '{path}': {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connectrpc::ErrorCode;
    use http::HeaderValue;

    #[test]
    fn keepalive_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(keepalive_interval(&headers), DEFAULT_KEEPALIVE);
        headers.insert("keepalive-ping-interval", HeaderValue::from_static("50"));
        assert_eq!(keepalive_interval(&headers), Duration::from_secs(50));
        headers.insert("keepalive-ping-interval", HeaderValue::from_static("soon"));
        assert_eq!(keepalive_interval(&headers), DEFAULT_KEEPALIVE);
    }

    #[test]
    fn io_errors_map_to_codes() {
        let path = Path::new("/x");
        let code = |kind| io_error("stat", path, &io::Error::from(kind)).code;
        assert_eq!(code(io::ErrorKind::NotFound), ErrorCode::NotFound);
        assert_eq!(code(io::ErrorKind::AlreadyExists), ErrorCode::AlreadyExists);
        assert_eq!(
            code(io::ErrorKind::PermissionDenied),
            ErrorCode::PermissionDenied
        );
        assert_eq!(
            code(io::ErrorKind::NotADirectory),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(io::ErrorKind::StorageFull),
            ErrorCode::ResourceExhausted
        );
        assert_eq!(code(io::ErrorKind::Other), ErrorCode::Internal);
    }
}
