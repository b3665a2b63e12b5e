//! `/files`: download (`GET`) and upload (`POST`), streamed in pieces of at most 64 KiB so a
//! file of any size never sits in memory.
//!
//! The token middleware lets `/files` through; here a request needs the access token header or
//! a valid URL signature ([`super::signing`]). The user is the `username` query parameter, else
//! envd's default user, and every file is opened or created with that user's identity
//! ([`crate::filesystem::as_user`]): what the user may not read or write fails with 403, and
//! what the user creates belongs to them.
//!
//! Uploads go to a temporary file beside the destination which is renamed over it at the end:
//! readers never see half a file, and a failed upload (full disk, client gone) leaves the old
//! file untouched. An existing destination must be writable by the user (checked by opening it
//! for writing) and keeps its permission bits; a new file gets 0644.
use std::io;
use std::os::fd::AsFd as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_compression::tokio::bufread::{GzipDecoder, GzipEncoder};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use thiserror::Error;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};

use super::json_error;
use super::signing::{Operation, signature};
use crate::auth::{ACCESS_TOKEN_HEADER, constant_time_eq, resolve_path};
use crate::filesystem::as_user::run_as;
use crate::filesystem::xattr;
use crate::state::Shared;
use crate::users::{User, UserError};

/// The size of the pieces files are read and written in.
const CHUNK: usize = 64 * 1024;
/// Received pieces waiting for the disk during an upload (each up to a few hundred KiB).
const UPLOAD_QUEUE: usize = 8;

/// The `/files` routes.
pub fn routes() -> axum::Router<Arc<Shared>> {
    axum::Router::new().route("/files", get(download).post(upload))
}

/// The query parameters of both methods.
#[derive(Debug, Default, Deserialize)]
struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<String>,
}

/// A failed `/files` request: its status and E2B's JSON error body.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct FilesError {
    status: StatusCode,
    message: String,
}

impl FilesError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for FilesError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.message, "/files failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "/files refused");
        }
        json_error(self.status, self.message)
    }
}

impl From<crate::filesystem::as_user::AsUserError> for FilesError {
    fn from(error: crate::filesystem::as_user::AsUserError) -> Self {
        Self::internal(
            connectrpc::ConnectError::from(error)
                .message
                .unwrap_or_default(),
        )
    }
}

/// The parsed query, with E2B's JSON body when it does not parse.
fn query(query: Result<Query<FilesQuery>, QueryRejection>) -> Result<FilesQuery, FilesError> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| FilesError::bad_request(rejection.body_text()))
}

/// The access check of `/files`: the token header, else a signature (when a token is set).
fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    query: &FilesQuery,
    operation: Operation,
) -> Result<(), FilesError> {
    let Some(token) = shared.read(|s| s.access_token.clone()) else {
        return Ok(());
    };
    if let Some(given) = headers.get(ACCESS_TOKEN_HEADER).filter(|v| !v.is_empty()) {
        return if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(FilesError::unauthorized(
                "access token present in header but does not match",
            ))
        };
    }
    let Some(given) = &query.signature else {
        return Err(FilesError::unauthorized(
            "missing signature query parameter",
        ));
    };
    let expiration = query
        .signature_expiration
        .as_deref()
        .map(|text| {
            text.trim().parse::<i64>().map_err(|_| {
                FilesError::bad_request(format!("invalid signature_expiration '{text}'"))
            })
        })
        .transpose()?;
    let expected = signature(
        query.path.as_deref().unwrap_or(""),
        operation,
        query.username.as_deref().unwrap_or(""),
        &token,
        expiration,
    );
    if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(FilesError::unauthorized("invalid signature"));
    }
    if let Some(expiration) = expiration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        if expiration < now {
            return Err(FilesError::unauthorized("signature is already expired"));
        }
    }
    Ok(())
}

/// The request's user: `username`, else the default user.
fn request_user(shared: &Shared, query: &FilesQuery) -> Result<User, FilesError> {
    let name = match &query.username {
        Some(name) if !name.is_empty() => name.clone(),
        _ => shared.read(|s| s.default_user.clone()),
    };
    if name.is_empty() {
        return Err(FilesError::bad_request(
            "no username given and envd has no default user",
        ));
    }
    shared.users.lookup(&name).map_err(|error| match error {
        UserError::UnknownUser(_) => {
            FilesError::unauthorized(format!("error looking up user '{name}': {error}"))
        }
        UserError::Read { .. } => FilesError::internal(error.to_string()),
    })
}

/// `path` resolved for `user` (an absent path is the start directory, like E2B's).
fn target_path(shared: &Shared, user: &User, path: Option<&str>) -> PathBuf {
    let workdir = shared.read(|s| s.default_workdir.clone());
    resolve_path(path.unwrap_or(""), user, workdir.as_deref())
}

// ---------------------------------------------------------------------------------------------
// Download

/// `GET /files`.
async fn download(
    State(shared): State<Arc<Shared>>,
    raw_query: Result<Query<FilesQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    match serve_download(&shared, raw_query, &headers).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn serve_download(
    shared: &Shared,
    raw_query: Result<Query<FilesQuery>, QueryRejection>,
    headers: &HeaderMap,
) -> Result<Response, FilesError> {
    let query = query(raw_query)?;
    authorize(shared, headers, &query, Operation::Read)?;
    let user = request_user(shared, &query)?;
    let path = target_path(shared, &user, query.path.as_deref());

    let opened = path.clone();
    let (file, meta) = run_as(&user, move || {
        // O_NONBLOCK: opening a FIFO must not hang the request (it is refused below).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&opened)?;
        let meta = file.metadata()?;
        Ok::<_, io::Error>((file, meta))
    })
    .await?
    .map_err(|error| match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => FilesError::new(
            StatusCode::NOT_FOUND,
            format!("path '{}' does not exist", path.display()),
        ),
        io::ErrorKind::PermissionDenied => FilesError::new(
            StatusCode::FORBIDDEN,
            format!(
                "permission denied: user '{}' cannot read '{}'",
                user.name,
                path.display()
            ),
        ),
        _ => FilesError::internal(format!("error opening file '{}': {error}", path.display())),
    })?;
    if meta.is_dir() {
        return Err(FilesError::bad_request(format!(
            "path '{}' is a directory",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(FilesError::bad_request(format!(
            "path '{}' is not a regular file",
            path.display()
        )));
    }
    let size = meta.len();
    let mut file = tokio::fs::File::from_std(file);

    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    response_headers.insert(header::CONTENT_TYPE, content_type(&path));
    if let Some(value) = content_disposition(&path) {
        response_headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));

    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let encoding = if range.is_some() {
        // A range is of the stored bytes: served as they are.
        Encoding::Identity
    } else {
        accepted_encoding(headers)?
    };

    if encoding == Encoding::Gzip {
        response_headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let reader = BufReader::with_capacity(CHUNK, file.take(size));
        let body = Body::from_stream(ReaderStream::with_capacity(GzipEncoder::new(reader), CHUNK));
        return Ok((StatusCode::OK, response_headers, body).into_response());
    }

    let (status, start, length) = match range.map(|r| parse_range(r, size)) {
        None | Some(RangeRequest::Ignored) => (StatusCode::OK, 0, size),
        Some(RangeRequest::Satisfiable { start, end }) => {
            response_headers.insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {start}-{end}/{size}"))?,
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Some(RangeRequest::Unsatisfiable) => {
            let mut response = json_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable for a file of {size} bytes"),
            );
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{size}"))?,
            );
            return Ok(response);
        }
    };
    if start > 0 {
        file.seek(io::SeekFrom::Start(start))
            .await
            .map_err(|error| FilesError::internal(format!("seeking: {error}")))?;
    }
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    let body = Body::from_stream(ReaderStream::with_capacity(file.take(length), CHUNK));
    Ok((status, response_headers, body).into_response())
}

fn header_value(text: &str) -> Result<HeaderValue, FilesError> {
    HeaderValue::from_str(text).map_err(|_| FilesError::internal("invalid header value"))
}

/// How a download is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

/// Picks the body encoding from `Accept-Encoding` (with q-values): gzip when the client
/// accepts it at least as much as the plain bytes; 406 when it accepts neither.
fn accepted_encoding(headers: &HeaderMap) -> Result<Encoding, FilesError> {
    let Some(value) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
    else {
        return Ok(Encoding::Identity);
    };
    let mut gzip: Option<f32> = None;
    let mut identity: Option<f32> = None;
    let mut any: Option<f32> = None;
    for item in value.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0f32;
        for param in parts {
            if let Some(v) = param.trim().strip_prefix("q=") {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q),
            "identity" => identity = Some(q),
            "*" => any = Some(q),
            _ => {}
        }
    }
    let gzip_q = gzip.or(any).unwrap_or(0.0);
    // Plain bytes are acceptable unless refused explicitly (or through `*;q=0`), but when not
    // named they come after any encoding the client did name.
    let identity_q = identity.or(any).unwrap_or(f32::MIN_POSITIVE);
    if gzip.is_some() && gzip_q > 0.0 && gzip_q >= identity_q {
        Ok(Encoding::Gzip)
    } else if identity_q > 0.0 {
        Ok(Encoding::Identity)
    } else if gzip_q > 0.0 {
        Ok(Encoding::Gzip)
    } else {
        Err(FilesError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "no supported encoding in Accept-Encoding '{value}' (supported: gzip, identity)"
            ),
        ))
    }
}

/// A `Range` header against a file of some size.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// Not a single byte range we serve (several ranges, another unit, malformed): the whole
    /// file is sent, which HTTP allows.
    Ignored,
    /// Bytes `start..=end`.
    Satisfiable { start: u64, end: u64 },
    /// Starts past the end.
    Unsatisfiable,
}

fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignored;
    };
    if spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignored;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // The last N bytes.
        let Ok(suffix) = last.parse::<u64>() else {
            return RangeRequest::Ignored;
        };
        if suffix == 0 || size == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Satisfiable {
            start: size.saturating_sub(suffix),
            end: size - 1,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return RangeRequest::Ignored;
    };
    let end = if last.is_empty() {
        size.saturating_sub(1)
    } else {
        match last.parse::<u64>() {
            Ok(end) if end >= start => end.min(size.saturating_sub(1)),
            _ => return RangeRequest::Ignored,
        }
    };
    if start >= size {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Satisfiable { start, end }
}

/// The content type by file extension (Go's built-in table plus common text types), else
/// `application/octet-stream`.
fn content_type(path: &Path) -> HeaderValue {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let kind = match extension.as_str() {
        "avif" => "image/avif",
        "css" => "text/css; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "gif" => "image/gif",
        "gz" => "application/gzip",
        "htm" | "html" => "text/html; charset=utf-8",
        "jpeg" | "jpg" => "image/jpeg",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "md" => "text/markdown; charset=utf-8",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "tar" => "application/x-tar",
        "txt" | "log" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        "webp" => "image/webp",
        "xml" => "text/xml; charset=utf-8",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    };
    HeaderValue::from_static(kind)
}

/// `inline; filename="<name>"`, in the RFC 5987 form when the name is not plain ASCII.
fn content_disposition(path: &Path) -> Option<HeaderValue> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let plain = name
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    let value = if plain {
        format!("inline; filename=\"{name}\"")
    } else {
        let encoded =
            percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC);
        format!("inline; filename*=UTF-8''{encoded}")
    };
    HeaderValue::from_str(&value).ok()
}

// ---------------------------------------------------------------------------------------------
// Upload

/// A stream of body bytes.
type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// One uploaded file, as the response lists it.
#[derive(Debug, serde::Serialize)]
struct Written {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    metadata: Vec<(String, String)>,
}

fn as_map<S: serde::Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// `POST /files`.
async fn upload(
    State(shared): State<Arc<Shared>>,
    raw_query: Result<Query<FilesQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match receive_upload(&shared, raw_query, &headers, body).await {
        Ok(written) => {
            let body = serde_json::to_string(&written).unwrap_or_else(|_| "[]".to_owned());
            let mut response = (StatusCode::OK, body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => error.into_response(),
    }
}

async fn receive_upload(
    shared: &Shared,
    raw_query: Result<Query<FilesQuery>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<Written>, FilesError> {
    let query = query(raw_query)?;
    authorize(shared, headers, &query, Operation::Write)?;
    let user = request_user(shared, &query)?;
    let metadata = metadata_headers(headers)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();

    let raw: ByteStream = Box::pin(body.into_data_stream().map_err(io::Error::other));
    let body = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("" | "identity") => raw,
        Some("gzip" | "x-gzip") => {
            let mut decoder = GzipDecoder::new(StreamReader::new(raw));
            decoder.multiple_members(true);
            Box::pin(ReaderStream::with_capacity(decoder, CHUNK))
        }
        Some(other) => {
            return Err(FilesError::bad_request(format!(
                "unsupported Content-Encoding '{other}' (supported: gzip, identity)"
            )));
        }
    };

    match essence.as_str() {
        "multipart/form-data" => {
            let boundary = multer::parse_boundary(&content_type).map_err(|error| {
                FilesError::bad_request(format!("error parsing multipart form: {error}"))
            })?;
            let mut form = multer::Multipart::new(body, boundary);
            let mut written: Vec<Written> = Vec::new();
            loop {
                let field = form.next_field().await.map_err(|error| {
                    FilesError::bad_request(format!("error reading form: {error}"))
                })?;
                let Some(field) = field else {
                    break;
                };
                if field.name() != Some("file") {
                    continue;
                }
                let wanted = match (&query.path, field.file_name()) {
                    (Some(path), _) => path.clone(),
                    (None, Some(name)) if !name.is_empty() => name.to_owned(),
                    _ => {
                        return Err(FilesError::bad_request(
                            "a file part needs a filename when there is no path parameter",
                        ));
                    }
                };
                let destination = target_path(shared, &user, Some(&wanted));
                if written.iter().any(|w| Path::new(&w.path) == destination) {
                    return Err(FilesError::bad_request(format!(
                        "you cannot upload multiple files to the same path '{}' in one upload request, only the first specified file was uploaded",
                        destination.display()
                    )));
                }
                let stream: ByteStream = Box::pin(field.map_err(io::Error::other));
                write_file(&user, &destination, stream, &metadata).await?;
                written.push(written_entry(&destination, &metadata));
            }
            Ok(written)
        }
        "application/octet-stream" => {
            let Some(path) = query.path.as_deref().filter(|p| !p.is_empty()) else {
                return Err(FilesError::bad_request(
                    "the path parameter is required for application/octet-stream uploads",
                ));
            };
            let destination = target_path(shared, &user, Some(path));
            write_file(&user, &destination, body, &metadata).await?;
            Ok(vec![written_entry(&destination, &metadata)])
        }
        _ => Err(FilesError::bad_request(format!(
            "unsupported Content-Type '{content_type}' (use multipart/form-data or application/octet-stream)"
        ))),
    }
}

fn written_entry(path: &Path, metadata: &[(String, String)]) -> Written {
    Written {
        name: path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        kind: "file",
        path: path.to_string_lossy().into_owned(),
        metadata: metadata.to_vec(),
    }
}

/// `X-Metadata-<key>: <value>` headers as (lower-cased key, value), checked against E2B's
/// limits: printable ASCII, keys of at most 246 bytes, at most 4096 bytes in all.
fn metadata_headers(headers: &HeaderMap) -> Result<Vec<(String, String)>, FilesError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut total = 0usize;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix("x-metadata-") else {
            continue;
        };
        if key.is_empty() || key.len() > xattr::MAX_KEY_LEN {
            return Err(FilesError::bad_request(format!(
                "metadata key '{key}' must be 1 to {} bytes",
                xattr::MAX_KEY_LEN
            )));
        }
        let value = value
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .ok_or_else(|| {
                FilesError::bad_request(format!(
                    "metadata value of '{key}' must be printable ASCII"
                ))
            })?;
        total += key.len() + value.len();
        if total > xattr::MAX_TOTAL_LEN {
            return Err(FilesError::bad_request(format!(
                "metadata exceeds {} bytes",
                xattr::MAX_TOTAL_LEN
            )));
        }
        pairs.retain(|(k, _)| k != key);
        pairs.push((key.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

/// The error for a failed write of `path`.
fn write_error(user: &User, path: &Path, error: &io::Error) -> FilesError {
    match error.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => FilesError::new(
            StatusCode::FORBIDDEN,
            format!(
                "permission denied: user '{}' cannot write '{}'",
                user.name,
                path.display()
            ),
        ),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => FilesError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("not enough disk space available for '{}'", path.display()),
        ),
        io::ErrorKind::IsADirectory => {
            FilesError::bad_request(format!("path is a directory: {}", path.display()))
        }
        io::ErrorKind::NotADirectory | io::ErrorKind::InvalidInput => {
            FilesError::bad_request(format!("cannot write '{}': {error}", path.display()))
        }
        _ => FilesError::internal(format!("error writing '{}': {error}", path.display())),
    }
}

/// Streams `body` into `destination` as `user`: parent directories, a temporary file beside
/// the destination, the data, the metadata, then a rename over the destination.
async fn write_file(
    user: &User,
    destination: &Path,
    mut body: ByteStream,
    metadata: &[(String, String)],
) -> Result<(), FilesError> {
    let target = destination.to_path_buf();
    let pairs = metadata.to_vec();
    let (file, temp) = run_as(user, move || create_temp(&target, &pairs))
        .await?
        .map_err(|error| write_error(user, destination, &error))?;
    // The disk writes happen on a blocking thread fed through a short queue, so receiving the
    // next piece overlaps with writing the last one (tokio's File would wait for each write).
    let (pieces, mut queue) = tokio::sync::mpsc::channel::<Bytes>(UPLOAD_QUEUE);
    let writer = tokio::task::spawn_blocking(move || -> io::Result<()> {
        use std::io::Write as _;
        let mut file = file;
        while let Some(piece) = queue.blocking_recv() {
            file.write_all(&piece)?;
        }
        file.flush()
    });

    let copied: Result<(), FilesError> = async {
        let mut received: Result<(), FilesError> = Ok(());
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => {
                    // A closed queue means the writer failed; its error is reported below.
                    if pieces.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    received = Err(FilesError::bad_request(format!(
                        "error reading the upload body: {error}"
                    )));
                    break;
                }
            }
        }
        drop(pieces);
        let written = writer
            .await
            .map_err(|error| FilesError::internal(format!("the upload writer failed: {error}")))?;
        received?;
        written.map_err(|error| write_error(user, destination, &error))?;
        let (from, to) = (temp.clone(), destination.to_path_buf());
        run_as(user, move || std::fs::rename(&from, &to))
            .await?
            .map_err(|error| write_error(user, destination, &error))
    }
    .await;
    if copied.is_err() {
        // Our own temporary file: removing it needs no particular identity.
        if let Err(error) = tokio::fs::remove_file(&temp).await
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %temp.display(), %error, "could not remove a temporary upload");
        }
    }
    copied
}

/// Run as the user: makes the parent directories, checks the destination, and creates the
/// temporary file (mode of the old file, else 0644; the metadata set).
fn create_temp(
    destination: &Path,
    metadata: &[(String, String)],
) -> io::Result<(std::fs::File, PathBuf)> {
    let parent = destination
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    let name = destination
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(parent)?;
    let mode = match std::fs::metadata(destination) {
        Ok(meta) if meta.is_dir() => return Err(io::ErrorKind::IsADirectory.into()),
        Ok(meta) => {
            // Replacing a file is allowed only to who may write it (as truncating would be).
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(destination)?;
            meta.permissions().mode() & 0o7777
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => 0o644,
        Err(error) => return Err(error),
    };
    let mut attempt = 0;
    loop {
        let mut random = [0u8; 8];
        crate::system::entropy::fill_unblocking(&mut random);
        let temp = parent.join(format!(
            ".{name}.upload-{:016x}",
            u64::from_le_bytes(random)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
        {
            Ok(file) => {
                let ready = file
                    .set_permissions(std::fs::Permissions::from_mode(mode))
                    .and_then(|()| xattr::write_metadata(file.as_fd(), metadata));
                return match ready {
                    Ok(()) => Ok((file, temp)),
                    Err(error) => {
                        let _ = std::fs::remove_file(&temp);
                        Err(error)
                    }
                };
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => {
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ranges_parse_like_http() {
        assert_eq!(
            parse_range("bytes=0-9", 100),
            RangeRequest::Satisfiable { start: 0, end: 9 }
        );
        assert_eq!(
            parse_range("bytes=90-", 100),
            RangeRequest::Satisfiable { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            RangeRequest::Satisfiable { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=50-500", 100),
            RangeRequest::Satisfiable { start: 50, end: 99 }
        );
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeRequest::Ignored);
        assert_eq!(parse_range("items=0-1", 100), RangeRequest::Ignored);
        assert_eq!(parse_range("bytes=9-3", 100), RangeRequest::Ignored);
    }

    fn accept(value: &str) -> Result<Encoding, FilesError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        accepted_encoding(&headers)
    }

    #[test]
    fn test_accept_encoding_choice() {
        assert_eq!(
            accepted_encoding(&HeaderMap::new()).unwrap(),
            Encoding::Identity
        );
        assert_eq!(accept("gzip").unwrap(), Encoding::Gzip);
        assert_eq!(accept("br, gzip;q=0.5").unwrap(), Encoding::Gzip);
        assert_eq!(accept("gzip;q=0").unwrap(), Encoding::Identity);
        assert_eq!(accept("br").unwrap(), Encoding::Identity);
        assert_eq!(
            accept("br, identity;q=0").unwrap_err().status,
            StatusCode::NOT_ACCEPTABLE
        );
    }

    #[test]
    fn test_metadata_headers_are_lowercased_and_limited() {
        let mut headers = HeaderMap::new();
        headers.insert("X-Metadata-Owner", HeaderValue::from_static("alice"));
        headers.insert("x-other", HeaderValue::from_static("ignored"));
        assert_eq!(
            metadata_headers(&headers).unwrap(),
            vec![("owner".to_owned(), "alice".to_owned())]
        );
        headers.insert(
            "x-metadata-big",
            HeaderValue::from_str(&"v".repeat(5000)).unwrap(),
        );
        assert_eq!(
            metadata_headers(&headers).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn test_content_disposition_quotes_or_encodes() {
        assert_eq!(
            content_disposition(Path::new("/a/b.txt")).unwrap(),
            "inline; filename=\"b.txt\""
        );
        assert_eq!(
            content_disposition(Path::new("/a/é.txt")).unwrap(),
            "inline; filename*=UTF-8''%C3%A9%2Etxt"
        );
    }
}
