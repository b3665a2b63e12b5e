//! Server tests over a real unix socket: a test thread plays the VMM, a client sends bytes.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;
use crate::api::models::{BootSource, VmState};

type Answer = Box<dyn Fn(&ApiRequest) -> Option<ApiResponse> + Send>;

struct TestServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Every request the test VMM received, in order.
    received: Arc<Mutex<Vec<ApiRequest>>>,
    /// The server's wake-up eventfd, to check it was written.
    wake: EventFd,
}

/// The test VMM's default answers. `None` drops the reply sender without answering.
fn default_answer(request: &ApiRequest) -> Option<ApiResponse> {
    Some(match request {
        ApiRequest::GetVersion => ApiResponse::Json(json!({"firecracker_version": "test"})),
        ApiRequest::GetInstanceInfo => ApiResponse::Json(json!({"state": "Not started"})),
        ApiRequest::GetSerial => ApiResponse::Bytes(b"console\x00bytes".to_vec()),
        ApiRequest::PatchVm(_) => ApiResponse::Fault(
            "The requested operation is not supported before starting the microVM.".into(),
        ),
        _ => ApiResponse::NoContent,
    })
}

fn start(config: ServerConfig, answer: Answer) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let wake = EventFd::new(EFD_NONBLOCK).unwrap();
    let (to_vmm, from_api) = mpsc::channel::<ApiMessage>();
    spawn_with_config(listener, to_vmm, wake.try_clone().unwrap(), config).unwrap();

    let received = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&received);
    thread::spawn(move || {
        for message in from_api {
            lock(&log).push(message.request.clone());
            if let Some(response) = answer(&message.request) {
                let _ = message.reply.send(response);
            }
        }
    });
    TestServer {
        _dir: dir,
        path,
        received,
        wake,
    }
}

fn test_config() -> ServerConfig {
    ServerConfig {
        request_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

fn start_default() -> TestServer {
    start(test_config(), Box::new(default_answer))
}

#[derive(Debug)]
struct ClientResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl ClientResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn fault_message(&self) -> String {
        assert_eq!(self.header("Content-Type"), Some("application/json"));
        let value: Value = serde_json::from_slice(&self.body).unwrap();
        value["fault_message"].as_str().unwrap().to_owned()
    }
}

struct Client {
    stream: UnixStream,
    buffered: Vec<u8>,
}

impl Client {
    fn connect(server: &TestServer) -> Self {
        let stream = UnixStream::connect(&server.path).unwrap();
        // A broken server fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            stream,
            buffered: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let count = self.stream.read(&mut chunk).unwrap();
        self.buffered.extend_from_slice(&chunk[..count]);
        count
    }

    fn take(&mut self, count: usize) -> Vec<u8> {
        while self.buffered.len() < count {
            assert!(self.fill() > 0, "connection closed inside a response");
        }
        self.buffered.drain(..count).collect()
    }

    fn response(&mut self) -> ClientResponse {
        let head_end = loop {
            if let Some(pos) = self.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            assert!(self.fill() > 0, "connection closed before a response");
        };
        let head = String::from_utf8(self.take(head_end)).unwrap();
        let mut lines = head.trim_end().split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status: u16 = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(": ").unwrap();
                (name.to_owned(), value.to_owned())
            })
            .collect();
        let length = headers
            .iter()
            .find(|(name, _)| name == "Content-Length")
            .map_or(0, |(_, value)| value.parse().unwrap());
        let body = self.take(length);
        ClientResponse {
            status,
            headers,
            body,
        }
    }

    fn request(&mut self, bytes: &[u8]) -> ClientResponse {
        self.send(bytes);
        self.response()
    }

    fn assert_closed(&mut self) {
        assert!(
            self.buffered.is_empty(),
            "unexpected bytes {:?}",
            self.buffered
        );
        assert_eq!(
            self.fill(),
            0,
            "the server should have closed the connection"
        );
    }
}

const GET_VERSION: &[u8] = b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n";

fn put(path: &str, body: &str) -> Vec<u8> {
    format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn assert_serves_version(server: &TestServer) {
    let mut client = Client::connect(server);
    let response = client.request(GET_VERSION);
    assert_eq!(response.status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&response.body).unwrap(),
        json!({"firecracker_version": "test"})
    );
}

#[test]
fn test_server_keep_alive_serves_two_requests_on_one_connection() {
    let server = start_default();
    let mut client = Client::connect(&server);

    let version = client.request(GET_VERSION);
    assert_eq!(version.status, 200);
    assert_eq!(version.header("Server"), Some("Wrenn VMM"));
    assert_eq!(version.header("Content-Type"), Some("application/json"));
    assert_eq!(version.header("Connection"), Some("keep-alive"));
    assert_eq!(
        version.header("Content-Length"),
        Some(version.body.len().to_string().as_str())
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&version.body).unwrap(),
        json!({"firecracker_version": "test"})
    );

    let boot = client.request(&put("/boot-source", r#"{"kernel_image_path":"/k"}"#));
    assert_eq!(boot.status, 204);
    assert!(boot.body.is_empty());
    assert_eq!(boot.header("Content-Length"), None);
    assert_eq!(boot.header("Server"), Some("Wrenn VMM"));

    assert_eq!(
        *lock(&server.received),
        vec![
            ApiRequest::GetVersion,
            ApiRequest::PutBootSource(BootSource {
                kernel_image_path: "/k".into(),
                boot_args: None,
                initrd_path: None,
            }),
        ]
    );
    // One wake-up per request.
    assert_eq!(server.wake.read().unwrap(), 2);
}

#[test]
fn test_server_pipelined_requests_are_answered_in_order() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let mut bytes = put("/actions", r#"{"action_type":"InstanceStart"}"#);
    bytes.extend_from_slice(b"GET /serial HTTP/1.1\r\n\r\n");
    bytes.extend_from_slice(GET_VERSION);
    client.send(&bytes);

    assert_eq!(client.response().status, 204);
    let serial = client.response();
    assert_eq!(serial.status, 200);
    assert_eq!(
        serial.header("Content-Type"),
        Some("application/octet-stream")
    );
    assert_eq!(serial.body, b"console\x00bytes");
    assert_eq!(client.response().status, 200);
    assert_eq!(lock(&server.received).len(), 3);
}

#[test]
fn test_server_route_error_is_answered_without_the_vmm_and_keeps_the_connection() {
    let server = start_default();
    let mut client = Client::connect(&server);

    let unknown = client.request(b"GET /foo?x=1 HTTP/1.1\r\n\r\n");
    assert_eq!(unknown.status, 400);
    assert_eq!(
        unknown.fault_message(),
        "Invalid request method and/or path: GET /foo"
    );
    let bad_body = client.request(&put(
        "/boot-source",
        r#"{"kernel_image_path":"/k","foo":1}"#,
    ));
    assert_eq!(bad_body.status, 400);
    assert!(bad_body.fault_message().contains("unknown field `foo`"));
    let empty = client.request(b"PUT /machine-config HTTP/1.1\r\n\r\n");
    assert_eq!(empty.fault_message(), "Empty request body");
    let mismatch = client.request(&put(
        "/drives/root",
        r#"{"drive_id":"other","is_root_device":true}"#,
    ));
    assert_eq!(
        mismatch.fault_message(),
        "The id from the path does not match the id from the body!"
    );

    assert_eq!(client.request(GET_VERSION).status, 200);
    assert_eq!(*lock(&server.received), vec![ApiRequest::GetVersion]);
}

#[test]
fn test_server_vmm_fault_becomes_400_with_fault_message() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let body = r#"{"state":"Paused"}"#;
    let request = format!(
        "PATCH /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = client.request(request.as_bytes());
    assert_eq!(response.status, 400);
    assert_eq!(
        response.fault_message(),
        "The requested operation is not supported before starting the microVM."
    );
    assert_eq!(
        *lock(&server.received),
        vec![ApiRequest::PatchVm(VmState::Paused)]
    );
}

#[test]
fn test_server_garbage_gets_400_and_close_then_a_new_connection_works() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let response = client.request(b"\x16\x03\x01\x00\xa5garbage\r\n\r\n");
    assert_eq!(response.status, 400);
    assert_eq!(response.header("Connection"), Some("close"));
    assert!(
        response
            .fault_message()
            .starts_with("Malformed request line")
    );
    client.assert_closed();

    assert_serves_version(&server);
    assert_eq!(*lock(&server.received), vec![ApiRequest::GetVersion]);
}

#[test]
fn test_server_oversize_body_gets_413_and_the_server_carries_on() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let body = vec![b' '; http::DEFAULT_MAX_BODY_BYTES + 1];
    let mut request = format!(
        "PUT /boot-source HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let response = client.request(&request);
    assert_eq!(response.status, 413);
    assert_eq!(
        response.fault_message(),
        "The request body is larger than the limit of 51200 bytes."
    );
    client.assert_closed();

    assert_serves_version(&server);
    assert!(
        lock(&server.received)
            .iter()
            .all(|r| *r == ApiRequest::GetVersion)
    );
}

#[test]
fn test_server_body_at_the_limit_is_accepted() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let json = r#"{"kernel_image_path":"/k"}"#;
    let padded = format!("{json:<width$}", width = http::DEFAULT_MAX_BODY_BYTES);
    assert_eq!(padded.len(), http::DEFAULT_MAX_BODY_BYTES);
    assert_eq!(client.request(&put("/boot-source", &padded)).status, 204);
}

#[test]
fn test_server_oversize_head_gets_431() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let filler = "x".repeat(http::DEFAULT_MAX_HEAD_BYTES);
    let response = client.request(format!("GET / HTTP/1.1\r\nX-Filler: {filler}").as_bytes());
    assert_eq!(response.status, 431);
    client.assert_closed();
    assert_serves_version(&server);
}

#[test]
fn test_server_chunked_body_gets_411() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let response = client.request(
        b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n12\r\n{\"state\":\"Paused\"}\r\n0\r\n\r\n",
    );
    assert_eq!(response.status, 411);
    assert!(response.fault_message().contains("Content-Length"));
    client.assert_closed();
    assert!(lock(&server.received).is_empty());
}

#[test]
fn test_server_connection_close_is_honoured() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let response = client.request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("Connection"), Some("close"));
    client.assert_closed();

    let mut old_client = Client::connect(&server);
    let response = old_client.request(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(response.status, 200);
    old_client.assert_closed();
}

#[test]
fn test_server_expect_continue_gets_100_before_the_body() {
    let server = start_default();
    let mut client = Client::connect(&server);
    let body = r#"{"kernel_image_path":"/k"}"#;
    client.send(
        format!(
            "PUT /boot-source HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(client.take(http::CONTINUE.len()), http::CONTINUE);
    client.send(body.as_bytes());
    assert_eq!(client.response().status, 204);
}

#[test]
fn test_server_stalled_client_times_out_and_does_not_block_another() {
    let config = ServerConfig {
        request_timeout: Duration::from_millis(1500),
        ..test_config()
    };
    let server = start(config, Box::new(default_answer));
    let mut stalled_in_head = Client::connect(&server);
    stalled_in_head.send(b"PUT /vm HTTP/1.1\r\nContent-Le");
    let mut stalled_in_body = Client::connect(&server);
    stalled_in_body.send(b"PUT /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"sta");

    let started = Instant::now();
    assert_serves_version(&server);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the second client waited for the stalled ones"
    );

    for stalled in [&mut stalled_in_head, &mut stalled_in_body] {
        let response = stalled.response();
        assert_eq!(response.status, 408);
        assert_eq!(
            response.fault_message(),
            "Timed out waiting for the rest of the request."
        );
        stalled.assert_closed();
    }
    assert_eq!(*lock(&server.received), vec![ApiRequest::GetVersion]);
}

#[test]
fn test_server_client_gone_mid_request_or_mid_response_is_survived() {
    let big = vec![7u8; 8 << 20];
    let answer: Answer = Box::new(move |request| match request {
        ApiRequest::GetSerial => Some(ApiResponse::Bytes(big.clone())),
        other => default_answer(other),
    });
    let server = start(test_config(), answer);

    let mut half = Client::connect(&server);
    half.send(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{");
    drop(half);

    let mut reader = Client::connect(&server);
    reader.send(b"GET /serial HTTP/1.1\r\n\r\n");
    assert!(reader.fill() > 0);
    drop(reader);

    assert_serves_version(&server);
    // The half request never reached the VMM.
    assert_eq!(
        *lock(&server.received),
        vec![ApiRequest::GetSerial, ApiRequest::GetVersion]
    );
}

#[test]
fn test_server_vmm_gone_gives_500() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (to_vmm, from_api) = mpsc::channel::<ApiMessage>();
    drop(from_api);
    spawn(listener, to_vmm, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();

    let mut client = Client {
        stream: UnixStream::connect(&path).unwrap(),
        buffered: Vec::new(),
    };
    let response = client.request(GET_VERSION);
    assert_eq!(response.status, 500);
    assert_eq!(response.fault_message(), "The VMM is not running.");
    // Still serving.
    assert_eq!(client.request(GET_VERSION).status, 500);
}

#[test]
fn test_server_vmm_dropping_the_reply_gives_500() {
    let answer: Answer = Box::new(|request| match request {
        ApiRequest::GetMetrics => None,
        other => default_answer(other),
    });
    let server = start(test_config(), answer);
    let mut client = Client::connect(&server);
    let response = client.request(b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(response.status, 500);
    assert_eq!(
        response.fault_message(),
        "The VMM did not answer the request."
    );
    assert_eq!(client.request(GET_VERSION).status, 200);
}

#[test]
fn test_server_full_table_closes_the_longest_idle_connection() {
    let config = ServerConfig {
        max_connections: 2,
        ..test_config()
    };
    let server = start(config, Box::new(default_answer));
    let mut oldest = Client::connect(&server);
    assert_eq!(oldest.request(GET_VERSION).status, 200);
    thread::sleep(Duration::from_millis(50));
    let mut newer = Client::connect(&server);
    assert_eq!(newer.request(GET_VERSION).status, 200);
    // Let both threads get back to waiting for their next request.
    thread::sleep(Duration::from_millis(100));

    assert_serves_version(&server);
    oldest.assert_closed();
    assert_eq!(newer.request(GET_VERSION).status, 200);
}

#[test]
fn test_server_full_table_of_busy_connections_refuses_with_503() {
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let (entered, in_vmm) = mpsc::channel::<()>();
    let answer: Answer = Box::new(move |request| {
        if *request == ApiRequest::GetMetrics {
            let _ = entered.send(());
            let _ = lock(&released).recv();
        }
        default_answer(request)
    });
    let config = ServerConfig {
        max_connections: 1,
        ..test_config()
    };
    let server = start(config, answer);

    let mut busy = Client::connect(&server);
    busy.send(b"GET /metrics HTTP/1.1\r\n\r\n");
    in_vmm.recv_timeout(Duration::from_secs(10)).unwrap();

    let mut refused = Client::connect(&server);
    let response = refused.response();
    assert_eq!(response.status, 503);
    assert_eq!(response.fault_message(), "Too many open API connections.");
    refused.assert_closed();

    release.send(()).unwrap();
    assert_eq!(busy.response().status, 204);
}

#[test]
fn test_response_for_maps_every_vmm_answer() {
    assert_eq!(
        response_for(ApiResponse::NoContent),
        Response::new(Status::NoContent, Body::Empty)
    );
    assert_eq!(
        response_for(ApiResponse::Json(json!({"a": [1, 2]}))),
        Response::new(Status::Ok, Body::Json(br#"{"a":[1,2]}"#.to_vec()))
    );
    assert_eq!(
        response_for(ApiResponse::Bytes(vec![0, 255])),
        Response::new(Status::Ok, Body::Bytes(vec![0, 255]))
    );
    assert_eq!(
        response_for(ApiResponse::Fault("no".into())),
        Response::fault(Status::BadRequest, "no")
    );
}

#[test]
fn test_decode_routes_a_parsed_request() {
    let bytes = put(
        "/drives/rootfs",
        r#"{"drive_id":"rootfs","is_root_device":true}"#,
    );
    let Ok(Parsed::Complete { request, .. }) = http::parse_request(&bytes, &Limits::default())
    else {
        panic!("the request should parse");
    };
    assert!(matches!(
        decode(&request),
        Ok(ApiRequest::PutDrive(drive)) if drive.drive_id == "rootfs" && drive.is_root_device
    ));
}

#[test]
fn test_server_head_request_closes_the_connection() {
    let server = start_default();
    let mut client = Client::connect(&server);
    client.send(b"HEAD / HTTP/1.1\r\n\r\n");
    let response = client.response();
    assert_eq!(response.status, 400);
    assert_eq!(response.header("Connection"), Some("close"));
    client.assert_closed();
}
