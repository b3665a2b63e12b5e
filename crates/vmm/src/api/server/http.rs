//! A small, strict HTTP/1.1 request parser and response writer.
//!
//! Only what the control API needs: a request line, header fields, and a body framed by
//! `Content-Length`. Chunked bodies, line folding and other rarely used corners are refused
//! with a clear status rather than half supported. Parsing is a pure function over the bytes
//! received so far, so the connection loop only has to read more when told the request is
//! incomplete, and the parser can be tested (and fuzzed) without sockets.
//!
//! Any error here means the request's framing is lost, so the connection is closed after the
//! error response.

use serde_json::json;

/// Size limits applied while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus header fields plus the blank line that ends them.
    pub max_head_bytes: usize,
    /// `Content-Length` above this is refused with 413.
    pub max_body_bytes: usize,
}

/// 8 KiB of headers is plenty for the API's clients and caps what a client can make us buffer.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;
/// Firecracker's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 51_200;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// A valid token such as `GET`; not necessarily one the API knows.
    pub method: String,
    /// The request target as sent (origin form, query included).
    pub target: String,
    pub version: Version,
    /// False when the client asked to close after this request (or spoke HTTP/1.0 without
    /// asking for keep-alive).
    pub keep_alive: bool,
    pub body: Vec<u8>,
}

/// What the bytes received so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `awaiting_continue` is true once the head is complete and the
    /// client said `Expect: 100-continue`: it may be waiting for `100 Continue` before it
    /// sends the body.
    Incomplete { awaiting_continue: bool },
    /// One request; `consumed` bytes of the buffer belong to it (a pipelined request may
    /// follow).
    Complete { request: Request, consumed: usize },
}

/// Why a request could not be framed. Every variant maps to a status and closes the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("Malformed request line: {0}.")]
    RequestLine(&'static str),
    #[error("Malformed header field: {0}.")]
    HeaderField(&'static str),
    #[error("HTTP version {0} is not supported; use HTTP/1.1.")]
    UnsupportedVersion(String),
    #[error("Invalid Content-Length header.")]
    InvalidContentLength,
    #[error("Conflicting Content-Length headers.")]
    ConflictingContentLength,
    #[error(
        "Transfer-Encoding (chunked bodies) is not supported; send the body with a Content-Length header."
    )]
    TransferEncoding,
    #[error("The request head is larger than the limit of {limit} bytes.")]
    HeadTooLarge { limit: usize },
    #[error("The request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: usize },
    #[error("Timed out waiting for the rest of the request.")]
    Timeout,
    #[error("Too many open API connections.")]
    TooManyConnections,
}

impl HttpError {
    pub fn status(&self) -> Status {
        match self {
            Self::RequestLine(_)
            | Self::HeaderField(_)
            | Self::InvalidContentLength
            | Self::ConflictingContentLength => Status::BadRequest,
            Self::UnsupportedVersion(_) => Status::VersionNotSupported,
            Self::TransferEncoding => Status::LengthRequired,
            Self::HeadTooLarge { .. } => Status::HeaderFieldsTooLarge,
            Self::BodyTooLarge { .. } => Status::PayloadTooLarge,
            Self::Timeout => Status::RequestTimeout,
            Self::TooManyConnections => Status::ServiceUnavailable,
        }
    }

    /// The fault response for this error; it always closes the connection.
    pub fn response(&self) -> Response {
        let mut response = Response::fault(self.status(), &self.to_string());
        response.close = true;
        response
    }
}

/// Parses one request from the front of `buf`.
///
/// Never panics, whatever the bytes. Returns an error as soon as the bytes cannot become a
/// valid request, including when the head or the declared body is over `limits`, so the
/// caller never buffers more than about `max_head_bytes + max_body_bytes`.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parsed, HttpError> {
    // RFC 9112 §2.2: empty lines before the request line are ignored (some clients send a
    // CRLF after a body).
    let start = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let rest = buf.get(start..).unwrap_or_default();
    let Some(head_len) = find_head_end(rest) else {
        if buf.len() > limits.max_head_bytes {
            return Err(HttpError::HeadTooLarge {
                limit: limits.max_head_bytes,
            });
        }
        return Ok(Parsed::Incomplete {
            awaiting_continue: false,
        });
    };
    let body_start = start + head_len;
    if body_start > limits.max_head_bytes {
        return Err(HttpError::HeadTooLarge {
            limit: limits.max_head_bytes,
        });
    }
    let head = parse_head(rest.get(..head_len).unwrap_or_default())?;

    let body_len = usize::try_from(head.content_length)
        .ok()
        .filter(|len| *len <= limits.max_body_bytes)
        .ok_or(HttpError::BodyTooLarge {
            limit: limits.max_body_bytes,
        })?;
    let end = body_start
        .checked_add(body_len)
        .ok_or(HttpError::BodyTooLarge {
            limit: limits.max_body_bytes,
        })?;
    let Some(body) = buf.get(body_start..end) else {
        return Ok(Parsed::Incomplete {
            awaiting_continue: head.expect_continue,
        });
    };
    Ok(Parsed::Complete {
        request: Request {
            method: head.method,
            target: head.target,
            version: head.version,
            keep_alive: head.keep_alive,
            body: body.to_vec(),
        },
        consumed: end,
    })
}

/// Length of the head (through the blank line ending it), if the whole head is in `buf`.
/// A bare LF is accepted as a line ending, as RFC 9112 §2.2 allows.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, b)| {
        if *b != b'\n' {
            return None;
        }
        match (buf.get(i + 1), buf.get(i + 2)) {
            (Some(b'\n'), _) => Some(i + 2),
            (Some(b'\r'), Some(b'\n')) => Some(i + 3),
            _ => None,
        }
    })
}

struct Head {
    method: String,
    target: String,
    version: Version,
    content_length: u64,
    keep_alive: bool,
    expect_continue: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = lines.next().unwrap_or_default();
    let (method, target, version) = parse_request_line(request_line)?;

    let mut content_length: Option<u64> = None;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    for line in lines.take_while(|line| !line.is_empty()) {
        let (name, value) = parse_field(line)?;
        if name.eq_ignore_ascii_case(b"content-length") {
            let length = parse_content_length(value)?;
            if content_length.is_some_and(|previous| previous != length) {
                return Err(HttpError::ConflictingContentLength);
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|b| *b == b',').map(trim_whitespace) {
                connection_close |= option.eq_ignore_ascii_case(b"close");
                connection_keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }

    let keep_alive = match version {
        Version::Http11 => !connection_close,
        Version::Http10 => connection_keep_alive && !connection_close,
    };
    Ok(Head {
        method,
        target,
        version,
        content_length: content_length.unwrap_or(0),
        keep_alive,
        // HTTP/1.0 clients do not know the interim response (RFC 9110 §10.1.1).
        expect_continue: expect_continue && version == Version::Http11,
    })
}

fn parse_request_line(line: &[u8]) -> Result<(String, String, Version), HttpError> {
    let line = std::str::from_utf8(line).map_err(|_| HttpError::RequestLine("not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::RequestLine(
            "expected `METHOD /path HTTP/1.1` separated by single spaces",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(HttpError::RequestLine("invalid method"));
    }
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::RequestLine("invalid request target"));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        other if is_http_version(other) => {
            return Err(HttpError::UnsupportedVersion(other.to_owned()));
        }
        _ => return Err(HttpError::RequestLine("invalid HTTP version")),
    };
    Ok((method.to_owned(), target.to_owned(), version))
}

/// `HTTP/<digit>.<digit>`
fn is_http_version(version: &str) -> bool {
    let bytes = version.as_bytes();
    matches!(bytes, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
        if major.is_ascii_digit() && minor.is_ascii_digit())
}

fn parse_field(line: &[u8]) -> Result<(&[u8], &[u8]), HttpError> {
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return Err(HttpError::HeaderField("line folding is not supported"));
    }
    let colon = line
        .iter()
        .position(|b| *b == b':')
        .ok_or(HttpError::HeaderField("missing `:`"))?;
    let (name, value) = line.split_at(colon);
    // RFC 9112 §5.1: no whitespace between the name and the colon.
    if name.is_empty() || !name.iter().copied().all(is_token_byte) {
        return Err(HttpError::HeaderField("invalid field name"));
    }
    let value = trim_whitespace(value.get(1..).unwrap_or_default());
    // CR, LF and NUL inside a value are how smuggling starts; other controls are noise.
    if value
        .iter()
        .any(|b| (b.is_ascii_control() && *b != b'\t') || *b == 0x7f)
    {
        return Err(HttpError::HeaderField("control character in field value"));
    }
    Ok((name, value))
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::InvalidContentLength);
    }
    // A number too big for u64 is still a well-formed (absurd) length: report it as too large.
    Ok(value
        .iter()
        .try_fold(0u64, |acc, digit| {
            acc.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        })
        .unwrap_or(u64::MAX))
}

fn trim_whitespace(bytes: &[u8]) -> &[u8] {
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Response statuses the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    NoContent,
    BadRequest,
    RequestTimeout,
    LengthRequired,
    PayloadTooLarge,
    HeaderFieldsTooLarge,
    InternalServerError,
    ServiceUnavailable,
    VersionNotSupported,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Self::Ok => 200,
            Self::NoContent => 204,
            Self::BadRequest => 400,
            Self::RequestTimeout => 408,
            Self::LengthRequired => 411,
            Self::PayloadTooLarge => 413,
            Self::HeaderFieldsTooLarge => 431,
            Self::InternalServerError => 500,
            Self::ServiceUnavailable => 503,
            Self::VersionNotSupported => 505,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::NoContent => "No Content",
            Self::BadRequest => "Bad Request",
            Self::RequestTimeout => "Request Timeout",
            Self::LengthRequired => "Length Required",
            Self::PayloadTooLarge => "Payload Too Large",
            Self::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Self::InternalServerError => "Internal Server Error",
            Self::ServiceUnavailable => "Service Unavailable",
            Self::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Empty,
    Json(Vec<u8>),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub body: Body,
    /// Send `Connection: close` and close after writing.
    pub close: bool,
}

/// The interim response a client that sent `Expect: 100-continue` waits for.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

const SERVER_NAME: &str = "Wrenn VMM";

impl Response {
    pub fn new(status: Status, body: Body) -> Self {
        Self {
            status,
            body,
            close: false,
        }
    }

    /// Firecracker's error shape: `{"fault_message": "..."}`.
    pub fn fault(status: Status, message: &str) -> Self {
        let body = json!({ "fault_message": message }).to_string().into_bytes();
        Self::new(status, Body::Json(body))
    }

    /// The response as it goes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (content_type, body) = match &self.body {
            Body::Empty => (None, &[][..]),
            Body::Json(bytes) => (Some("application/json"), bytes.as_slice()),
            Body::Bytes(bytes) => (Some("application/octet-stream"), bytes.as_slice()),
        };
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: {SERVER_NAME}\r\nConnection: {}\r\n",
            self.status.code(),
            self.status.reason(),
            if self.close { "close" } else { "keep-alive" },
        );
        if let Some(content_type) = content_type {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        // RFC 9110 §8.6: a 204 must not carry Content-Length.
        if self.status != Status::NoContent {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut wire = head.into_bytes();
        wire.extend_from_slice(body);
        wire
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(bytes: &[u8]) -> Result<Parsed, HttpError> {
        parse_request(bytes, &Limits::default())
    }

    fn complete(bytes: &[u8]) -> (Request, usize) {
        match parse(bytes) {
            Ok(Parsed::Complete { request, consumed }) => (request, consumed),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn test_parse_get_without_body_is_complete() {
        let bytes = b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let (request, consumed) = complete(bytes);
        assert_eq!(request.method, "GET");
        assert_eq!(request.target, "/version");
        assert_eq!(request.version, Version::Http11);
        assert!(request.keep_alive);
        assert!(request.body.is_empty());
        assert_eq!(consumed, bytes.len());
    }

    #[test]
    fn test_parse_put_with_body_consumes_exactly_the_body() {
        let bytes = b"PUT /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        let (request, consumed) = complete(bytes);
        assert_eq!(request.body, b"hello");
        assert_eq!(consumed, bytes.len() - b"GET / HTTP/1.1\r\n\r\n".len());
        let (next, _) = complete(&bytes[consumed..]);
        assert_eq!(next.target, "/");
    }

    #[test]
    fn test_parse_every_proper_prefix_is_incomplete() {
        let bytes = b"PUT /drives/a HTTP/1.1\r\nContent-Length: 3\r\n\r\n{ }";
        for end in 0..bytes.len() {
            assert!(
                matches!(parse(&bytes[..end]), Ok(Parsed::Incomplete { .. })),
                "prefix of {end} bytes"
            );
        }
        assert_eq!(complete(bytes).0.body, b"{ }");
    }

    #[test]
    fn test_parse_bare_lf_line_endings_are_accepted() {
        let (request, _) = complete(b"PUT /x HTTP/1.1\nContent-Length: 2\n\n{}");
        assert_eq!(request.body, b"{}");
    }

    #[test]
    fn test_parse_leading_empty_lines_are_skipped() {
        let bytes = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (request, consumed) = complete(bytes);
        assert_eq!(request.target, "/");
        assert_eq!(consumed, bytes.len());
    }

    #[test]
    fn test_parse_connection_close_and_http10_defaults() {
        let (request, _) = complete(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!request.keep_alive);
        let (request, _) = complete(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(request.version, Version::Http10);
        assert!(!request.keep_alive);
        let (request, _) = complete(b"GET / HTTP/1.0\r\nConnection: foo, keep-alive\r\n\r\n");
        assert!(request.keep_alive);
    }

    #[test]
    fn test_parse_expect_continue_is_reported_while_body_is_missing() {
        let head = b"PUT /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse(head),
            Ok(Parsed::Incomplete {
                awaiting_continue: true
            })
        );
        let mut full = head.to_vec();
        full.extend_from_slice(b"{}");
        assert_eq!(complete(&full).0.body, b"{}");
        let http10 = b"PUT /vm HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse(http10),
            Ok(Parsed::Incomplete {
                awaiting_continue: false
            })
        );
    }

    #[test]
    fn test_parse_malformed_request_lines_are_rejected() {
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTX/1.1\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HttpError::RequestLine(_))),
                "{:?} gave {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
            assert_eq!(parse(bad).unwrap_err().status(), Status::BadRequest);
        }
    }

    #[test]
    fn test_parse_other_http_versions_get_505() {
        let err = parse(b"GET / HTTP/2.0\r\n\r\n").unwrap_err();
        assert_eq!(err, HttpError::UnsupportedVersion("HTTP/2.0".into()));
        assert_eq!(err.status().code(), 505);
    }

    #[test]
    fn test_parse_malformed_header_fields_are_rejected() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost localhost\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost : localhost\r\n\r\n",
            b"GET / HTTP/1.1\r\n: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HttpError::HeaderField(_))),
                "{:?} gave {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
    }

    #[test]
    fn test_parse_content_length_errors() {
        assert_eq!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HttpError::InvalidContentLength)
        );
        assert_eq!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n"),
            Err(HttpError::InvalidContentLength)
        );
        assert_eq!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"),
            Err(HttpError::ConflictingContentLength)
        );
        let (request, _) =
            complete(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length:2\r\n\r\n{}");
        assert_eq!(request.body, b"{}");
    }

    #[test]
    fn test_parse_chunked_body_gets_411() {
        let err =
            parse(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
                .unwrap_err();
        assert_eq!(err, HttpError::TransferEncoding);
        assert_eq!(err.status().code(), 411);
        assert!(err.to_string().contains("Content-Length"));
    }

    #[test]
    fn test_parse_oversize_body_gets_413_before_the_body_arrives() {
        let limit = DEFAULT_MAX_BODY_BYTES;
        let at_limit = format!("PUT /vm HTTP/1.1\r\nContent-Length: {limit}\r\n\r\n");
        assert!(matches!(
            parse(at_limit.as_bytes()),
            Ok(Parsed::Incomplete { .. })
        ));
        let over = format!("PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n", limit + 1);
        let err = parse(over.as_bytes()).unwrap_err();
        assert_eq!(err, HttpError::BodyTooLarge { limit });
        assert_eq!(err.status().code(), 413);
        let huge = b"PUT /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(parse(huge), Err(HttpError::BodyTooLarge { limit }));
    }

    #[test]
    fn test_parse_oversize_head_gets_431_complete_or_not() {
        let limits = Limits::default();
        let filler = "a".repeat(limits.max_head_bytes);
        let unfinished = format!("GET / HTTP/1.1\r\nX-Filler: {filler}");
        let err = parse(unfinished.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            HttpError::HeadTooLarge {
                limit: limits.max_head_bytes
            }
        );
        assert_eq!(err.status().code(), 431);
        let finished = format!("{unfinished}\r\n\r\n");
        assert_eq!(parse(finished.as_bytes()), Err(err));
        // Blank lines count too, or a client could make us buffer them forever.
        let blank = vec![b'\n'; limits.max_head_bytes + 1];
        assert!(matches!(parse(&blank), Err(HttpError::HeadTooLarge { .. })));
    }

    #[test]
    fn test_response_encode_json_has_length_type_and_server() {
        let wire = Response::new(Status::Ok, Body::Json(b"{\"a\":1}".to_vec())).encode();
        let text = String::from_utf8(wire).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nServer: Wrenn VMM\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn test_response_encode_no_content_has_no_length_and_close_is_sent() {
        let mut response = Response::new(Status::NoContent, Body::Empty);
        response.close = true;
        let text = String::from_utf8(response.encode()).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nServer: Wrenn VMM\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn test_response_fault_escapes_the_message() {
        let response = Response::fault(Status::BadRequest, "bad \"quote\"\n");
        let Body::Json(body) = &response.body else {
            panic!("fault bodies are JSON");
        };
        let value: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(value["fault_message"], "bad \"quote\"\n");
    }

    proptest! {
        #[test]
        fn prop_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let limits = Limits { max_head_bytes: 256, max_body_bytes: 64 };
            if let Ok(Parsed::Complete { consumed, request }) = parse_request(&bytes, &limits) {
                prop_assert!(consumed <= bytes.len());
                prop_assert!(consumed > 0);
                prop_assert!(request.body.len() <= limits.max_body_bytes);
            }
        }

        #[test]
        fn prop_request_shaped_bytes_never_panic(
            method in "[A-Z]{0,6}",
            target in "[ -~]{0,20}",
            headers in proptest::collection::vec(("[ -~]{0,12}", "[\\x00-\\xff]{0,12}"), 0..6),
            separator in prop_oneof![Just("\r\n"), Just("\n"), Just("\r")],
            body in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut bytes = format!("{method} {target} HTTP/1.1{separator}").into_bytes();
            for (name, value) in &headers {
                bytes.extend_from_slice(format!("{name}: {value}{separator}").as_bytes());
            }
            bytes.extend_from_slice(separator.as_bytes());
            bytes.extend_from_slice(&body);
            let limits = Limits::default();
            for end in 0..=bytes.len() {
                if let Ok(Parsed::Complete { consumed, .. }) = parse_request(&bytes[..end], &limits) {
                    prop_assert!(consumed <= end);
                }
            }
        }
    }
}
