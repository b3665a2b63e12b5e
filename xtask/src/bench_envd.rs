//! `cargo xtask bench envd`: envd's cost over doing the same thing directly on the host.
//!
//! A release envd runs on the host on a free port (users from a temporary `--etc`, default
//! user root, no token), driven by the small HTTP/1.1 client below over one kept-alive
//! connection, with the Connect JSON codec the SDKs use. Each measurement has a baseline
//! measured in the same run:
//!
//! 1. exec: `/bin/true` through `process.Process/Start` (request sent to end-of-stream frame
//!    read), 200 samples after a warm-up, against spawning and waiting for `/bin/true` with
//!    `std::process::Command`; p50, p99 and the overhead ratio (envd / direct, ≥ 1).
//! 2. stdout: `head -c 512M /dev/zero` through Start (base64 in JSON envelopes, every byte
//!    counted) against reading the same command's stdout from a pipe; MiB/s and the ratio
//!    (envd / pipe, ≤ 1).
//! 3. files: a 512 MiB file uploaded with `POST /files` (octet-stream, streamed from disk)
//!    and downloaded with `GET /files` (read to the end), against `cp` of the same file;
//!    MiB/s and ratios (envd / cp).
//!
//! Throughputs are the median of `--runs` rounds (default 3). `WRENN_BENCH_ENVD=/path/to/envd`
//! measures that binary instead of a fresh release build.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// Outer override: the envd binary to measure.
const ENVD_ENV: &str = "WRENN_BENCH_ENVD";
/// Round trips of `true` measured (both sides), after [`EXEC_WARMUP`] unmeasured ones.
const EXEC_SAMPLES: usize = 200;
const EXEC_WARMUP: usize = 10;
/// Bytes streamed through stdout and moved through `/files`.
const STREAM_BYTES: u64 = 512 << 20;
const FILE_BYTES: u64 = 512 << 20;
/// Throughput rounds when `--runs` says nothing.
const DEFAULT_ROUNDS: usize = 3;
/// Read and write size of the client.
const CHUNK: usize = 1 << 20;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(300);

pub fn run(runs: Option<usize>) -> Result<ExitCode> {
    let rounds = runs.unwrap_or(DEFAULT_ROUNDS).max(1);
    let binary = match std::env::var_os(ENVD_ENV) {
        Some(path) => PathBuf::from(path),
        None => crate::bench_vmm::build_release("wrenn-envd", "envd")?,
    };
    let scratch = Scratch::new()?;
    let envd = Envd::start(&binary, &scratch.0)?;
    let mut conn = Conn::open(envd.port)?;

    // 1. exec round trips.
    for _ in 0..EXEC_WARMUP {
        exec_true(&mut conn)?;
        direct_true()?;
    }
    let mut exec = Vec::with_capacity(EXEC_SAMPLES);
    let mut direct = Vec::with_capacity(EXEC_SAMPLES);
    for _ in 0..EXEC_SAMPLES {
        exec.push(exec_true(&mut conn)?);
        direct.push(direct_true()?);
    }
    let exec = Stats::of(&exec);
    let direct = Stats::of(&direct);
    exec.print("exec_true");
    direct.print("direct_true");
    let exec_ratio = exec.p50 / direct.p50;
    println!("BENCH envd exec_overhead_ratio={exec_ratio:.2}x");

    // 2. stdout streaming. Lost output makes the number meaningless: it is reported, the
    // other measurements still run, and the bench fails at the end.
    let mut problems = Vec::new();
    let mut stdout = Vec::new();
    let mut pipe = Vec::new();
    for _ in 0..rounds {
        let (bytes, elapsed) = stream_stdout(&mut conn)?;
        if bytes == STREAM_BYTES {
            stdout.push(mib_per_s(STREAM_BYTES, elapsed));
        } else {
            println!("BENCH envd stdout_received={bytes}B of {STREAM_BYTES}B");
            problems.push(format!(
                "Start delivered {bytes} of the {STREAM_BYTES} bytes `head` wrote"
            ));
        }
        pipe.push(mib_per_s(STREAM_BYTES, stream_pipe()?));
    }
    let (stdout, pipe) = (median(&stdout), median(&pipe));
    println!("BENCH envd stdout_throughput={stdout:.0}MiB/s");
    println!("BENCH envd pipe_throughput={pipe:.0}MiB/s");
    println!("BENCH envd stdout_ratio={:.2}x", stdout / pipe);

    // 3. /files upload and download against cp.
    let source = scratch.0.join("source.bin");
    write_source(&source)?;
    let uploaded = scratch.0.join("uploaded.bin");
    let copied = scratch.0.join("copied.bin");
    let mut upload = Vec::new();
    let mut download = Vec::new();
    let mut copy = Vec::new();
    for _ in 0..rounds {
        upload.push(mib_per_s(
            FILE_BYTES,
            upload_file(&mut conn, &source, &uploaded)?,
        ));
        download.push(mib_per_s(FILE_BYTES, download_file(&mut conn, &uploaded)?));
        copy.push(mib_per_s(FILE_BYTES, cp(&source, &copied)?));
    }
    ensure!(
        wrenn_image::cache::sha256_file(&uploaded)? == wrenn_image::cache::sha256_file(&source)?,
        "the uploaded file differs from its source"
    );
    let (upload, download, copy) = (median(&upload), median(&download), median(&copy));
    println!("BENCH envd upload_throughput={upload:.0}MiB/s");
    println!("BENCH envd download_throughput={download:.0}MiB/s");
    println!("BENCH envd cp_throughput={copy:.0}MiB/s");
    println!("BENCH envd upload_ratio={:.2}x", upload / copy);
    println!("BENCH envd download_ratio={:.2}x", download / copy);

    println!(
        "RESULT envd exec_median={:.3}ms exec_p99={:.3}ms direct_median={:.3}ms direct_p99={:.3}ms \
         exec_ratio={exec_ratio:.2}x stdout={stdout:.0}MiB/s pipe={pipe:.0}MiB/s stdout_ratio={:.2}x \
         upload={upload:.0}MiB/s download={download:.0}MiB/s cp={copy:.0}MiB/s \
         upload_ratio={:.2}x download_ratio={:.2}x",
        exec.p50,
        exec.p99,
        direct.p50,
        direct.p99,
        stdout / pipe,
        upload / copy,
        download / copy,
    );
    drop(conn);
    drop(envd);
    if problems.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        eprintln!("error: {problem}");
    }
    Ok(ExitCode::FAILURE)
}

/// A temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("wrenn-bench-envd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("etc"))?;
        fs::create_dir_all(dir.join("root"))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The envd under measurement; killed on drop.
struct Envd {
    child: Child,
    port: u16,
}

impl Envd {
    fn start(binary: &Path, dir: &Path) -> Result<Self> {
        fs::write(
            dir.join("etc/passwd"),
            format!("root:x:0:0:root:{}:/bin/sh\n", dir.join("root").display()),
        )?;
        fs::write(dir.join("etc/group"), "root:x:0:\n")?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let child = Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--default-user",
                "root",
                "--etc",
            ])
            .arg(dir.join("etc"))
            .env("ENVD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut envd = Self { child, port };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = envd.child.try_wait()? {
                bail!("envd exited at start ({status})");
            }
            let healthy = Conn::open(port)
                .and_then(|mut c| c.get("/health"))
                .is_ok_and(|status| status == 204);
            if healthy {
                return Ok(envd);
            }
            ensure!(Instant::now() < deadline, "envd did not answer /health");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One kept-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// How a response body ends.
enum Framing {
    Length(u64),
    Chunked { left: u64, done: bool },
}

/// A response body being read; the connection is reusable once it returned 0.
struct Body<'a> {
    reader: &'a mut BufReader<TcpStream>,
    framing: Framing,
}

impl Conn {
    fn open(port: u16) -> Result<Self> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Self {
            reader: BufReader::with_capacity(CHUNK, stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends a request head (the body, `length` bytes, follows with `write_all`).
    fn send_head(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        length: u64,
    ) -> Result<()> {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {length}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        self.writer.write_all(head.as_bytes())?;
        Ok(())
    }

    /// Reads a response head; returns the status and the body.
    fn response(&mut self) -> Result<(u16, Body<'_>)> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut framing = Framing::Length(0);
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                framing = Framing::Length(value.parse().context("content-length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.eq_ignore_ascii_case("chunked")
            {
                framing = Framing::Chunked {
                    left: 0,
                    done: false,
                };
            }
        }
        Ok((
            status,
            Body {
                reader: &mut self.reader,
                framing,
            },
        ))
    }

    /// A bodiless GET; returns the status (the body is read and dropped).
    fn get(&mut self, path: &str) -> Result<u16> {
        self.send_head("GET", path, &[], 0)?;
        let (status, mut body) = self.response()?;
        std::io::copy(&mut body, &mut std::io::sink())?;
        Ok(status)
    }
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = match &mut self.framing {
            Framing::Length(left) => left,
            Framing::Chunked { done: true, .. } => return Ok(0),
            Framing::Chunked { left, done } => {
                if *left == 0 {
                    let mut line = String::new();
                    self.reader.read_line(&mut line)?;
                    if line.trim().is_empty() {
                        // The CRLF closing the previous chunk.
                        line.clear();
                        self.reader.read_line(&mut line)?;
                    }
                    let size = line.trim().split(';').next().unwrap_or_default();
                    *left = u64::from_str_radix(size, 16)
                        .map_err(|e| std::io::Error::other(format!("chunk size {line:?}: {e}")))?;
                    if *left == 0 {
                        // The trailer section ends with an empty line.
                        loop {
                            line.clear();
                            self.reader.read_line(&mut line)?;
                            if line.trim().is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                }
                left
            }
        };
        if *left == 0 {
            return Ok(0);
        }
        let max = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
        let n = self.reader.read(&mut buf[..max])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        *left -= n as u64;
        Ok(n)
    }
}

/// A Connect envelope with a JSON payload.
fn envelope(json: &serde_json::Value) -> Vec<u8> {
    let payload = serde_json::to_vec(json).unwrap_or_default();
    let mut out = vec![0u8];
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&payload);
    out
}

/// Runs `cmd args` through Start; returns the stdout bytes seen and the elapsed time from
/// sending the request to the end-of-stream frame. Fails unless the process ended with 0.
fn start(conn: &mut Conn, cmd: &str, args: &[&str]) -> Result<(u64, Duration)> {
    let body = envelope(&serde_json::json!({
        "process": {"cmd": cmd, "args": args},
        "stdin": false,
    }));
    let started = Instant::now();
    conn.send_head(
        "POST",
        "/process.Process/Start",
        &[
            ("content-type", "application/connect+json"),
            ("connect-protocol-version", "1"),
        ],
        body.len() as u64,
    )?;
    conn.writer.write_all(&body)?;
    let (status, mut body) = conn.response()?;
    ensure!(status == 200, "Start answered {status}");
    let mut stdout = 0u64;
    let mut ended = false;
    let mut payload = Vec::new();
    loop {
        let mut header = [0u8; 5];
        match body.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        payload.resize(usize::try_from(len)?, 0);
        body.read_exact(&mut payload)?;
        if header[0] & 2 != 0 {
            let end: serde_json::Value = serde_json::from_slice(&payload)?;
            ensure!(end.get("error").is_none(), "Start failed: {end}");
            // The body ends after this frame; drain the chunked terminator.
            std::io::copy(&mut body, &mut std::io::sink())?;
            break;
        }
        if let Some(len) = stdout_len(&payload) {
            stdout += len;
        } else {
            let event: serde_json::Value = serde_json::from_slice(&payload)?;
            if let Some(end) = event.pointer("/event/end") {
                let code = end.get("exitCode").and_then(|c| c.as_i64()).unwrap_or(0);
                ensure!(code == 0, "{cmd} exited with {code}: {end}");
                ended = true;
            }
        }
    }
    let elapsed = started.elapsed();
    ensure!(ended, "the Start stream of {cmd} had no end event");
    Ok((stdout, elapsed))
}

/// Decoded length of the base64 in a `{"event":{"data":{"stdout":"..."}}}` payload, found
/// without parsing the whole JSON (base64 holds no quotes or escapes).
fn stdout_len(payload: &[u8]) -> Option<u64> {
    // envd's own layout first (constant time), then a search for other key orders.
    const PREFIX: &[u8] = b"{\"event\":{\"data\":{\"stdout\":\"";
    const SUFFIX: &[u8] = b"\"}}}";
    const KEY: &[u8] = b"\"stdout\":\"";
    let encoded = if let Some(rest) = payload
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
        && !rest.contains(&b'"')
    {
        rest
    } else {
        let start = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
        let rest = &payload[start..];
        let end = rest.iter().position(|&b| b == b'"')?;
        &rest[..end]
    };
    let padding = encoded.iter().rev().take_while(|&&b| b == b'=').count();
    Some((encoded.len() / 4 * 3 - padding) as u64)
}

fn exec_true(conn: &mut Conn) -> Result<Duration> {
    let (out, elapsed) = start(conn, "/bin/true", &[])?;
    ensure!(out == 0, "true wrote {out} bytes");
    Ok(elapsed)
}

fn direct_true() -> Result<Duration> {
    let started = Instant::now();
    let status = Command::new("/bin/true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let elapsed = started.elapsed();
    ensure!(status.success(), "true failed: {status}");
    Ok(elapsed)
}

/// `head -c 512M /dev/zero` through Start: the stdout bytes received and the time taken.
fn stream_stdout(conn: &mut Conn) -> Result<(u64, Duration)> {
    let count = STREAM_BYTES.to_string();
    start(conn, "/usr/bin/head", &["-c", &count, "/dev/zero"])
}

fn stream_pipe() -> Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new("/usr/bin/head")
        .args(["-c", &STREAM_BYTES.to_string(), "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let status = child.wait()?;
    let elapsed = started.elapsed();
    ensure!(
        status.success() && total == STREAM_BYTES,
        "head: {status}, {total} bytes"
    );
    Ok(elapsed)
}

/// A file of varied (not all-zero) content, so nothing along the way can shortcut it.
fn write_source(path: &Path) -> Result<()> {
    let mut file = std::io::BufWriter::with_capacity(CHUNK, File::create(path)?);
    let mut block = vec![0u8; CHUNK];
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..FILE_BYTES / CHUNK as u64 {
        for word in block.chunks_exact_mut(8) {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block)?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// `path` percent-encoded for a query string.
fn query_escape(path: &Path) -> String {
    let mut out = String::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn upload_file(conn: &mut Conn, source: &Path, destination: &Path) -> Result<Duration> {
    let mut file = File::open(source)?;
    let length = file.metadata()?.len();
    let started = Instant::now();
    conn.send_head(
        "POST",
        &format!("/files?path={}", query_escape(destination)),
        &[("content-type", "application/octet-stream")],
        length,
    )?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        conn.writer.write_all(&buf[..n])?;
    }
    let (status, mut body) = conn.response()?;
    let mut text = String::new();
    body.read_to_string(&mut text)?;
    let elapsed = started.elapsed();
    ensure!(status == 200, "upload answered {status}: {text}");
    let written = fs::metadata(destination)?.len();
    ensure!(written == length, "uploaded {written} bytes, not {length}");
    Ok(elapsed)
}

fn download_file(conn: &mut Conn, path: &Path) -> Result<Duration> {
    let started = Instant::now();
    conn.send_head(
        "GET",
        &format!("/files?path={}", query_escape(path)),
        &[],
        0,
    )?;
    let (status, mut body) = conn.response()?;
    ensure!(status == 200, "download answered {status}");
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let elapsed = started.elapsed();
    ensure!(
        total == FILE_BYTES,
        "downloaded {total} bytes, not {FILE_BYTES}"
    );
    Ok(elapsed)
}

fn cp(source: &Path, destination: &Path) -> Result<Duration> {
    let _ = fs::remove_file(destination);
    let started = Instant::now();
    let status = Command::new("cp").arg(source).arg(destination).status()?;
    let elapsed = started.elapsed();
    ensure!(status.success(), "cp failed: {status}");
    Ok(elapsed)
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / f64::from(1 << 20) / elapsed.as_secs_f64().max(1e-9)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Latency percentiles in milliseconds.
struct Stats {
    p50: f64,
    p99: f64,
    min: f64,
    max: f64,
    count: usize,
}

impl Stats {
    fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = |p: usize| {
            let r = (ms.len() * p).div_ceil(100);
            ms.get(r.saturating_sub(1)).copied().unwrap_or(0.0)
        };
        Self {
            p50: rank(50),
            p99: rank(99),
            min: ms.first().copied().unwrap_or(0.0),
            max: ms.last().copied().unwrap_or(0.0),
            count: ms.len(),
        }
    }

    fn print(&self, name: &str) {
        println!("BENCH envd {name}_p50={:.3}ms", self.p50);
        println!("BENCH envd {name}_p99={:.3}ms", self.p99);
        println!("BENCH envd {name}_min={:.3}ms", self.min);
        println!("BENCH envd {name}_max={:.3}ms", self.max);
        println!("BENCH envd {name}_samples={}", self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stdout_len_decodes_base64_length() {
        assert_eq!(
            stdout_len(br#"{"event":{"data":{"stdout":"aGkK"}}}"#),
            Some(3)
        );
        assert_eq!(
            stdout_len(br#"{"event":{"data":{"stdout":"aGk="}}}"#),
            Some(2)
        );
        assert_eq!(
            stdout_len(br#"{"event":{"data":{"stderr":"eA==","stdout":"eHg="}}}"#),
            Some(2)
        );
        assert_eq!(stdout_len(br#"{"event":{"start":{"pid":3}}}"#), None);
    }

    #[test]
    fn test_query_escape_keeps_only_unreserved() {
        assert_eq!(
            query_escape(Path::new("/tmp/a b.bin")),
            "%2Ftmp%2Fa%20b.bin"
        );
    }

    #[test]
    fn test_stats_of_nearest_rank() {
        let samples: Vec<_> = (1..=200).map(Duration::from_millis).collect();
        let s = Stats::of(&samples);
        assert_eq!((s.p50, s.p99, s.count), (100.0, 198.0, 200));
    }
}
