//! Test support: envd started as a real process on a free port, with its own user database,
//! and a small HTTP/1.1 client that speaks the Connect protocol's JSON forms by hand (unary,
//! server streams read envelope by envelope, client streams), independent of the server's
//! Connect library.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The uid/gid of the unprivileged test user `tester`.
pub const TESTER_UID: u32 = 4242;

/// A running envd.
pub struct Envd {
    child: Child,
    pub port: u16,
    /// Root of the test's files: `etc/` (passwd, group), `home/tester`, `root/`.
    pub dir: tempfile::TempDir,
}

impl Envd {
    /// envd as root's default user, with users `root` (home `<dir>/root`) and `tester`
    /// (uid/gid 4242, home `<dir>/home/tester`, also in group `extra` 4343).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("root")).unwrap();
        let home = root.join("home/tester");
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(TESTER_UID), Some(TESTER_UID)).unwrap();
        // The tester must be able to reach its home through the temp directory.
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            format!(
                "root:x:0:0:root:{}:/bin/sh\ntester:x:{TESTER_UID}:{TESTER_UID}::{}:/bin/sh\n",
                root.join("root").display(),
                home.display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            format!("root:x:0:\ntester:x:{TESTER_UID}:\nextra:x:4343:tester\n"),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_envd"))
            .arg("--port")
            .arg(port.to_string())
            .arg("--etc")
            .arg(root.join("etc"))
            .args(extra_args)
            .env("ENVD_LOG", "debug")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let envd = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if envd
                .client()
                .get("/health")
                .is_ok_and(|reply| reply.status == 204)
            {
                break;
            }
            assert!(Instant::now() < deadline, "envd did not answer /health");
            std::thread::sleep(Duration::from_millis(20));
        }
        envd
    }

    pub fn client(&self) -> Client {
        Client {
            port: self.port,
            headers: Vec::new(),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home/tester")
    }

    pub fn root_home(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Whether the process is still running (it must survive bad requests).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One frame of a Connect stream.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The envelope's flags byte.
    pub flags: u8,
    /// The end-of-stream frame (flag 0x02).
    pub end: bool,
    pub json: Value,
}

/// A client with default headers (add `x-access-token`, `authorization` ...).
#[derive(Clone, Debug)]
pub struct Client {
    pub port: u16,
    pub headers: Vec<(String, String)>,
}

/// `Authorization` header selecting `user` the way the SDKs do (Basic, empty password).
pub fn basic(user: &str) -> (String, String) {
    use base64::Engine as _;
    (
        "authorization".into(),
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
        ),
    )
}

/// One Connect envelope.
pub fn envelope(flags: u8, json: &Value) -> Vec<u8> {
    let payload = serde_json::to_vec(json).unwrap();
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

impl Client {
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn user(self, user: &str) -> Self {
        let (k, v) = basic(user);
        self.with(&k, &v)
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(stream)
    }

    /// Sends a request and returns the stream positioned at the body, with the head parsed.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Head> {
        let mut stream = self.connect()?;
        let defaults = self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        write_request(
            &mut stream,
            method,
            path,
            defaults.chain(headers.iter().copied()),
            body,
        )?;
        read_head(stream)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        let (status, headers, mut reader) = self.send(method, path, headers, body)?;
        let mut body = Vec::new();
        reader.read_to_end(&mut body)?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub fn get(&self, path: &str) -> std::io::Result<Reply> {
        self.request("GET", path, &[], &[])
    }

    /// A unary Connect call with the JSON codec.
    pub fn unary(&self, method: &str, request: &Value) -> Reply {
        self.request(
            "POST",
            &format!("/{method}"),
            &[
                ("content-type", "application/json"),
                ("connect-protocol-version", "1"),
            ],
            &serde_json::to_vec(request).unwrap(),
        )
        .unwrap()
    }

    /// A server-streaming Connect call; frames are read as they arrive.
    pub fn server_stream(&self, method: &str, request: &Value, headers: &[(&str, &str)]) -> Stream {
        let mut all = vec![
            ("content-type", "application/connect+json"),
            ("connect-protocol-version", "1"),
        ];
        all.extend_from_slice(headers);
        let (status, headers, reader) = self
            .send("POST", &format!("/{method}"), &all, &envelope(0, request))
            .unwrap();
        Stream {
            status,
            headers,
            reader,
        }
    }

    /// A client-streaming Connect call: all messages, then the reply's frames.
    pub fn client_stream(&self, method: &str, messages: &[Value]) -> Vec<Frame> {
        let mut body = Vec::new();
        for message in messages {
            body.extend(envelope(0, message));
        }
        let (status, _, reader) = self
            .send(
                "POST",
                &format!("/{method}"),
                &[
                    ("content-type", "application/connect+json"),
                    ("connect-protocol-version", "1"),
                ],
                &body,
            )
            .unwrap();
        assert_eq!(status, 200);
        let mut stream = Stream {
            status,
            headers: Vec::new(),
            reader,
        };
        let mut frames = Vec::new();
        while let Some(frame) = stream.next() {
            frames.push(frame);
        }
        frames
    }
}

/// A streaming response.
pub struct Stream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BodyReader,
}

impl Stream {
    pub fn from_parts(status: u16, reader: BodyReader) -> Self {
        Self {
            status,
            headers: Vec::new(),
            reader,
        }
    }

    /// The next frame, or None at the end of the body.
    pub fn next(&mut self) -> Option<Frame> {
        next_frame(&mut self.reader)
    }

    /// Frames up to and including the end frame.
    pub fn collect(mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next() {
            let end = frame.end;
            frames.push(frame);
            if end {
                break;
            }
        }
        frames
    }
}

/// A response body, chunked or length-delimited or until close.
pub struct BodyReader {
    inner: BufReader<Box<dyn Read + Send>>,
    mode: BodyMode,
}

enum BodyMode {
    Length(u64),
    Chunked { left: u64, done: bool },
    Close,
}

/// Status, headers (names lower-cased) and the body still to read.
pub type Head = (u16, Vec<(String, String)>, BodyReader);

/// Writes an HTTP/1.1 request with `Connection: close`.
fn write_request<'a>(
    stream: &mut impl Write,
    method: &str,
    path: &str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)
}

/// One request on an already connected stream (e.g. a vsock connection through the VMM's
/// socket); the whole response, de-chunked.
pub fn request_on(
    mut stream: impl Read + Write + Send + 'static,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    write_request(&mut stream, method, path, headers.iter().copied(), body)?;
    let (status, headers, mut reader) = read_head(stream)?;
    let mut body = Vec::new();
    reader.read_to_end(&mut body)?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The next envelope from `reader`, or None at a clean end.
fn next_frame(reader: &mut impl Read) -> Option<Frame> {
    let mut header = [0u8; 5];
    if let Err(error) = reader.read_exact(&mut header) {
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
        return None;
    }
    let len = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).expect("truncated envelope");
    let json = serde_json::from_slice(&payload)
        .unwrap_or_else(|e| panic!("envelope is not JSON ({e}): {payload:?}"));
    Some(Frame {
        flags: header[0],
        end: header[0] & 2 != 0,
        json,
    })
}

/// Splits a whole Connect stream body into envelopes; every byte must belong to one.
pub fn frames(mut body: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "truncated envelope header: {body:?}");
        out.push(next_frame(&mut body).expect("an envelope"));
    }
    out
}

fn read_head(stream: impl Read + Send + 'static) -> std::io::Result<Head> {
    let mut inner = BufReader::new(Box::new(stream) as Box<dyn Read + Send>);
    let mut line = String::new();
    inner.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        inner.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((k, v)) = trimmed.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mode = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        BodyMode::Chunked {
            left: 0,
            done: false,
        }
    } else if let Some(len) = find("content-length") {
        BodyMode::Length(len.parse().unwrap_or(0))
    } else if status == 204 || status == 304 {
        BodyMode::Length(0)
    } else {
        BodyMode::Close
    };
    Ok((status, headers, BodyReader { inner, mode }))
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.mode {
            BodyMode::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let max = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                let n = self.inner.read(&mut buf[..max])?;
                *left -= n as u64;
                Ok(n)
            }
            BodyMode::Close => self.inner.read(buf),
            BodyMode::Chunked { left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut line = String::new();
                    self.inner.read_line(&mut line)?;
                    if line.trim().is_empty() {
                        line.clear();
                        self.inner.read_line(&mut line)?;
                    }
                    let size =
                        u64::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                            .map_err(|e| {
                                std::io::Error::other(format!("chunk size {line:?}: {e}"))
                            })?;
                    if size == 0 {
                        *done = true;
                        return Ok(0);
                    }
                    *left = size;
                }
                let max = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                let n = self.inner.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                *left -= n as u64;
                Ok(n)
            }
        }
    }
}

/// Base64 of `bytes` (Connect's JSON form of `bytes` fields).
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Bytes of a base64 field.
pub fn unb64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// Waits until `check` holds (polling), failing after 10 s.
pub fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}
