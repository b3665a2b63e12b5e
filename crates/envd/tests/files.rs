//! `/files` against the real envd binary: uploads (multipart, raw, gzip), downloads (plain,
//! gzip, ranges), errors, signed URLs, ownership, and a large file streamed through a small
//! memory footprint.
mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use common::{Client, Envd, TESTER_UID, exists};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::json;
use sha2::{Digest as _, Sha256};

fn enc(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// A multipart body with one `file` part per (filename, data).
fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "wrennBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (filename, data) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Runs `gzip` with `args` over `input` (a real gzip, independent of envd's).
fn gzip(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    out
}

fn upload(client: &Client, query: &str, content_type: &str, body: &[u8]) -> common::Reply {
    client
        .request(
            "POST",
            &format!("/files?{query}"),
            &[("content-type", content_type)],
            body,
        )
        .unwrap()
}

#[test]
fn uploads_multipart_raw_and_gzip() {
    let envd = Envd::start();
    let client = envd.client();
    let home = envd.home();

    // The SDK's single-file write: multipart with ?path= and the same filename, as tester.
    let dest = home.join("dir/new/a.txt");
    let (ct, body) = multipart(&[(&p(&dest), b"hello world")]);
    let reply = upload(
        &client,
        &format!("path={}&username=tester", enc(&p(&dest))),
        &ct,
        &body,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!([{"name": "a.txt", "type": "file", "path": p(&dest)}])
    );
    assert_eq!(std::fs::read(&dest).unwrap(), b"hello world");
    let meta = std::fs::metadata(&dest).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (TESTER_UID, TESTER_UID));
    assert_eq!(meta.mode() & 0o777, 0o644);
    // Parents the upload made are the tester's too.
    let parent = std::fs::metadata(home.join("dir/new")).unwrap();
    assert_eq!(parent.uid(), TESTER_UID);
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(home.join("dir/new")).unwrap().count(), 1);

    // Several parts, destinations from the filenames (relative ones start at the home).
    let (ct, body) = multipart(&[("one.txt", b"1"), ("sub/two.txt", b"22")]);
    let reply = upload(&client, "username=tester", &ct, &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json().as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read(home.join("one.txt")).unwrap(), b"1");
    assert_eq!(std::fs::read(home.join("sub/two.txt")).unwrap(), b"22");

    // The same destination twice is refused.
    let (ct, body) = multipart(&[("same.txt", b"1"), ("same.txt", b"2")]);
    let reply = upload(&client, "username=tester", &ct, &body);
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.json()["code"], 400);

    // Raw bytes; overwriting keeps the old file's mode.
    let raw = home.join("raw.bin");
    let reply = upload(
        &client,
        &format!("path={}&username=tester", enc(&p(&raw))),
        "application/octet-stream",
        &[0u8, 1, 2, 3],
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(std::fs::read(&raw).unwrap(), [0, 1, 2, 3]);
    std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let reply = upload(
        &client,
        &format!("path={}&username=tester", enc(&p(&raw))),
        "application/octet-stream",
        b"new",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(std::fs::read(&raw).unwrap(), b"new");
    assert_eq!(std::fs::metadata(&raw).unwrap().mode() & 0o777, 0o600);

    // Gzip-encoded raw body, decompressed on the way in.
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let packed = gzip(&["-c"], &data);
    let reply = client
        .request(
            "POST",
            &format!("/files?path={}", enc(&p(&home.join("unzipped")))),
            &[
                ("content-type", "application/octet-stream"),
                ("content-encoding", "gzip"),
            ],
            &packed,
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(std::fs::read(home.join("unzipped")).unwrap(), data);

    // Metadata headers become user.e2b.* xattrs, reported by Stat.
    let tagged = home.join("tagged.txt");
    let reply = client
        .request(
            "POST",
            &format!("/files?path={}", enc(&p(&tagged))),
            &[
                ("content-type", "application/octet-stream"),
                ("x-metadata-Owner", "alice"),
            ],
            b"x",
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()[0]["metadata"], json!({"owner": "alice"}));
    let stat = client.unary("filesystem.Filesystem/Stat", &json!({"path": p(&tagged)}));
    assert_eq!(stat.json()["entry"]["metadata"], json!({"owner": "alice"}));

    // Bad requests.
    let other = upload(&client, "path=/tmp/x", "text/plain", b"x");
    assert_eq!(other.status, 400);
    let no_path = upload(&client, "", "application/octet-stream", b"x");
    assert_eq!(no_path.status, 400);
    let onto_dir = upload(
        &client,
        &format!("path={}", enc(&p(&home))),
        "application/octet-stream",
        b"x",
    );
    assert_eq!(onto_dir.status, 400, "{}", onto_dir.text());
}

#[test]
fn uploads_respect_the_users_permissions() {
    let envd = Envd::start();
    let client = envd.client();
    let secret = envd.dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = secret.join("deep/file.txt");
    let reply = upload(
        &client,
        &format!("path={}&username=tester", enc(&p(&target))),
        "application/octet-stream",
        b"nope",
    );
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.json()["code"], 403);
    assert!(!exists(&secret.join("deep")));

    // A root-owned file in the tester's own directory may not be replaced by the tester.
    let owned_by_root = envd.home().join("root.txt");
    std::fs::write(&owned_by_root, b"root's").unwrap();
    std::fs::set_permissions(&owned_by_root, std::fs::Permissions::from_mode(0o644)).unwrap();
    let reply = upload(
        &client,
        &format!("path={}&username=tester", enc(&p(&owned_by_root))),
        "application/octet-stream",
        b"mine now",
    );
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(std::fs::read(&owned_by_root).unwrap(), b"root's");

    // Unknown users are unauthorized; reading what the tester may not read is forbidden.
    let reply = client
        .get("/files?path=/etc/hostname&username=ghost")
        .unwrap();
    assert_eq!(reply.status, 401);
    assert!(reply.json()["message"].as_str().unwrap().contains("ghost"));
    let private = secret.join("private");
    std::fs::write(&private, b"x").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let reply = client
        .get(&format!(
            "/files?path={}&username=tester",
            enc(&p(&private))
        ))
        .unwrap();
    assert_eq!(reply.status, 403, "{}", reply.text());
}

#[test]
fn downloads_plain_gzip_and_ranges() {
    let envd = Envd::start();
    let client = envd.client();
    let file = envd.root_home().join("notes.txt");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let url = format!("/files?path={}", enc(&p(&file)));

    let plain = client.get(&url).unwrap();
    assert_eq!(plain.status, 200);
    assert_eq!(plain.body, data);
    assert_eq!(
        plain.header("content-disposition"),
        Some("inline; filename=\"notes.txt\"")
    );
    assert_eq!(plain.header("vary"), Some("Accept-Encoding"));
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(plain.header("content-length"), Some("100000"));

    let zipped = client
        .request("GET", &url, &[("accept-encoding", "gzip")], &[])
        .unwrap();
    assert_eq!(zipped.status, 200);
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    assert!(zipped.body.len() < data.len());
    assert_eq!(gzip(&["-dc"], &zipped.body), data);

    let part = client
        .request("GET", &url, &[("range", "bytes=10-19")], &[])
        .unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some("bytes 10-19/100000"));
    assert_eq!(part.body, &data[10..20]);
    let tail = client
        .request("GET", &url, &[("range", "bytes=-5")], &[])
        .unwrap();
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, &data[data.len() - 5..]);
    let beyond = client
        .request("GET", &url, &[("range", "bytes=100000-")], &[])
        .unwrap();
    assert_eq!(beyond.status, 416);
    assert_eq!(beyond.header("content-range"), Some("bytes */100000"));

    // Relative to the user's home; missing; a directory.
    let relative = client.get("/files?path=notes.txt").unwrap();
    assert_eq!(relative.body, data);
    let missing = envd.root_home().join("missing.txt");
    let reply = client
        .get(&format!("/files?path={}", enc(&p(&missing))))
        .unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.json()["message"],
        format!("path '{}' does not exist", p(&missing))
    );
    let reply = client
        .get(&format!("/files?path={}", enc(&p(&envd.root_home()))))
        .unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json()["message"],
        format!("path '{}' is a directory", p(&envd.root_home()))
    );
}

fn sign(path: &str, operation: &str, user: &str, token: &str, expiration: Option<i64>) -> String {
    let mut raw = format!("{path}:{operation}:{user}:{token}");
    if let Some(expiration) = expiration {
        raw.push_str(&format!(":{expiration}"));
    }
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes()))
    )
}

#[test]
fn token_and_signatures() {
    let envd = Envd::start();
    let client = envd.client();
    let init = client
        .request(
            "POST",
            "/init",
            &[("content-type", "application/json")],
            json!({"accessToken": "secret"}).to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(init.status, 204, "{}", init.text());
    let path = p(&envd.home().join("shared.txt"));
    std::fs::write(&path, b"signed content").unwrap();
    std::os::unix::fs::chown(&path, Some(TESTER_UID), Some(TESTER_UID)).unwrap();
    let base = format!("/files?path={}&username=tester", enc(&path));

    let denied = client.get(&base).unwrap();
    assert_eq!(denied.status, 401);
    let wrong_token = client
        .request("GET", &base, &[("x-access-token", "guess")], &[])
        .unwrap();
    assert_eq!(wrong_token.status, 401);
    let with_token = client
        .request("GET", &base, &[("x-access-token", "secret")], &[])
        .unwrap();
    assert_eq!(with_token.status, 200);
    assert_eq!(with_token.body, b"signed content");

    let good = sign(&path, "read", "tester", "secret", None);
    let reply = client
        .get(&format!("{base}&signature={}", enc(&good)))
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.body, b"signed content");

    let wrong = sign(&path, "read", "tester", "other-token", None);
    let reply = client
        .get(&format!("{base}&signature={}", enc(&wrong)))
        .unwrap();
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["message"], "invalid signature");
    // A read signature does not allow writing.
    let reply = client
        .request(
            "POST",
            &format!("{base}&signature={}", enc(&good)),
            &[("content-type", "application/octet-stream")],
            b"overwrite",
        )
        .unwrap();
    assert_eq!(reply.status, 401);
    assert_eq!(std::fs::read(&path).unwrap(), b"signed content");

    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let expired = sign(&path, "read", "tester", "secret", Some(now - 10));
    let reply = client
        .get(&format!(
            "{base}&signature={}&signature_expiration={}",
            enc(&expired),
            now - 10
        ))
        .unwrap();
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["message"], "signature is already expired");
    let fresh = sign(&path, "write", "tester", "secret", Some(now + 600));
    let reply = client
        .request(
            "POST",
            &format!(
                "{base}&signature={}&signature_expiration={}",
                enc(&fresh),
                now + 600
            ),
            &[("content-type", "application/octet-stream")],
            b"written with a signature",
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(std::fs::read(&path).unwrap(), b"written with a signature");
}

/// envd's peak resident memory (VmHWM, KiB), found by its `--port` argument.
fn envd_peak_rss_kib(port: u16) -> u64 {
    let wanted = format!("--port\0{port}\0");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(&wanted) {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap()
            .to_owned();
        return line.split_whitespace().nth(1).unwrap().parse().unwrap();
    }
    panic!("envd process not found");
}

#[test]
fn large_files_stream_through_little_memory() {
    const SIZE: usize = 128 << 20;
    let envd = Envd::start();
    let client = envd.client();
    let mut data = vec![0u8; SIZE];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let expected = Sha256::digest(&data);
    let path = envd.root_home().join("big.bin");

    let reply = upload(
        &client,
        &format!("path={}", enc(&p(&path))),
        "application/octet-stream",
        &data,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    drop(data);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE as u64);

    let (status, _, mut body) = client
        .send("GET", &format!("/files?path={}", enc(&p(&path))), &[], &[])
        .unwrap();
    assert_eq!(status, 200);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = body.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        total += n;
        hasher.update(&buffer[..n]);
    }
    assert_eq!(total, SIZE);
    assert_eq!(hasher.finalize(), expected);

    let peak_kib = envd_peak_rss_kib(envd.port);
    eprintln!("envd VmHWM after 128 MiB up and down: {peak_kib} KiB");
    assert!(
        peak_kib < 32 * 1024,
        "envd peaked at {peak_kib} KiB moving a 128 MiB file"
    );
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_507_and_keeps_the_old_file() {
    let envd = Envd::start();
    let mount = envd.dir.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let _disk = SmallDisk(mount.clone());
    let target = mount.join("file.bin");
    std::fs::write(&target, b"old").unwrap();
    let reply = upload(
        &envd.client(),
        &format!("path={}", enc(&p(&target))),
        "application/octet-stream",
        &vec![1u8; 4 << 20],
    );
    assert_eq!(reply.status, 507, "{}", reply.text());
    assert_eq!(reply.json()["code"], 507);
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
    // The partial temporary file is gone.
    assert_eq!(std::fs::read_dir(&mount).unwrap().count(), 1);
}
