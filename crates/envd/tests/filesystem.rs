//! The `filesystem.Filesystem` service over the hand-written Connect client, against the real
//! envd binary: every RPC, the error codes, user permissions, and watches.
mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Client, Envd, TESTER_UID, exists, wait_for};
use serde_json::{Value, json};

fn call(client: &Client, method: &str, request: &Value) -> common::Reply {
    client.unary(&format!("filesystem.Filesystem/{method}"), request)
}

/// Asserts a Connect unary error with `code` (and its HTTP status).
fn assert_code(reply: &common::Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.json()["code"], code, "{}", reply.text());
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

#[test]
fn stat_make_dir_move_remove() {
    let mut envd = Envd::start();
    let root = envd.client();
    let base = envd.root_home();

    // MakeDir creates parents; a second time it already exists; a file is not a directory.
    let made = call(&root, "MakeDir", &json!({"path": p(&base.join("a/b/c"))}));
    assert_eq!(made.status, 200, "{}", made.text());
    assert_eq!(made.json()["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(made.json()["entry"]["name"], "c");
    assert!(base.join("a/b/c").is_dir());
    assert_code(
        &call(&root, "MakeDir", &json!({"path": p(&base.join("a/b"))})),
        409,
        "already_exists",
    );
    let file = base.join("a/file.txt");
    std::fs::write(&file, b"hello").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_code(
        &call(&root, "MakeDir", &json!({"path": p(&file)})),
        400,
        "invalid_argument",
    );

    // Stat: E2B's fields; relative paths start at the user's home.
    let stat = call(&root, "Stat", &json!({"path": "a/file.txt"}));
    assert_eq!(stat.status, 200, "{}", stat.text());
    let entry = &stat.json()["entry"];
    assert_eq!(entry["name"], "file.txt");
    assert_eq!(entry["type"], "FILE_TYPE_FILE");
    assert_eq!(entry["path"], p(&file));
    assert_eq!(entry["size"], "5");
    assert_eq!(entry["mode"], 0o644);
    assert_eq!(entry["permissions"], "-rw-r--r--");
    assert_eq!(entry["owner"], "root");
    assert_eq!(entry["group"], "root");
    assert!(
        entry["modifiedTime"].as_str().unwrap().ends_with('Z'),
        "{entry}"
    );
    let missing = call(&root, "Stat", &json!({"path": p(&base.join("nope"))}));
    assert_code(&missing, 404, "not_found");
    assert!(
        missing.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("file not found")
    );

    // Move creates the destination's parents.
    let dest = base.join("x/y/moved.txt");
    let moved = call(
        &root,
        "Move",
        &json!({"source": p(&file), "destination": p(&dest)}),
    );
    assert_eq!(moved.status, 200, "{}", moved.text());
    assert_eq!(moved.json()["entry"]["path"], p(&dest));
    assert!(!exists(&file));
    assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
    assert_code(
        &call(
            &root,
            "Move",
            &json!({"source": p(&file), "destination": p(&base.join("z"))}),
        ),
        404,
        "not_found",
    );
    assert!(!exists(&base.join("z")));

    // Remove: a file, a whole tree, and something missing.
    assert_eq!(
        call(&root, "Remove", &json!({"path": p(&dest)})).status,
        200
    );
    assert!(!exists(&dest));
    assert_eq!(
        call(&root, "Remove", &json!({"path": p(&base.join("a"))})).status,
        200
    );
    assert!(!exists(&base.join("a")));
    assert_code(
        &call(&root, "Remove", &json!({"path": p(&base.join("a"))})),
        404,
        "not_found",
    );
    assert!(envd.alive());
}

#[test]
fn list_dir_depth_and_symlinks() {
    let envd = Envd::start();
    let root = envd.client();
    let d = envd.root_home().join("tree");
    std::fs::create_dir_all(d.join("sub/deep")).unwrap();
    std::fs::write(d.join("f.txt"), b"1").unwrap();
    std::fs::write(d.join("sub/g.txt"), b"22").unwrap();
    std::fs::write(d.join("sub/deep/h.txt"), b"333").unwrap();
    std::os::unix::fs::symlink(d.join("sub"), d.join("link")).unwrap();
    let dlink = envd.root_home().join("dlink");
    std::os::unix::fs::symlink(&d, &dlink).unwrap();

    let names = |reply: &common::Reply| -> Vec<String> {
        let mut names: Vec<String> = reply.json()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };

    // depth 0 means 1.
    let one = call(&root, "ListDir", &json!({"path": p(&d)}));
    assert_eq!(one.status, 200, "{}", one.text());
    assert_eq!(
        names(&one),
        [p(&d.join("f.txt")), p(&d.join("link")), p(&d.join("sub"))]
    );
    let link = one.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "link")
        .unwrap()
        .clone();
    assert_eq!(link["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(link["symlinkTarget"], p(&d.join("sub")));
    assert!(link["permissions"].as_str().unwrap().starts_with('L'));

    // depth 2 enters `sub` but not the symlink to it.
    let two = call(&root, "ListDir", &json!({"path": p(&d), "depth": 2}));
    assert_eq!(
        names(&two),
        [
            p(&d.join("f.txt")),
            p(&d.join("link")),
            p(&d.join("sub")),
            p(&d.join("sub/deep")),
            p(&d.join("sub/g.txt")),
        ]
    );

    // A symlinked root is followed, and entries carry the requested prefix.
    let via_link = call(&root, "ListDir", &json!({"path": p(&dlink), "depth": 1}));
    assert_eq!(via_link.status, 200, "{}", via_link.text());
    assert!(
        names(&via_link).contains(&p(&dlink.join("f.txt"))),
        "{:?}",
        names(&via_link)
    );

    assert_code(
        &call(&root, "ListDir", &json!({"path": p(&d.join("none"))})),
        404,
        "not_found",
    );
    assert_code(
        &call(&root, "ListDir", &json!({"path": p(&d.join("f.txt"))})),
        400,
        "invalid_argument",
    );
}

#[test]
fn operations_run_with_the_users_permissions() {
    let envd = Envd::start();
    let tester = envd.client().user("tester");
    let secret = envd.dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("file"), b"root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();

    for (method, request) in [
        ("Stat", json!({"path": p(&secret.join("file"))})),
        ("ListDir", json!({"path": p(&secret)})),
        ("MakeDir", json!({"path": p(&secret.join("new"))})),
        ("Remove", json!({"path": p(&secret.join("file"))})),
        (
            "Move",
            json!({"source": p(&secret.join("file")), "destination": "stolen"}),
        ),
    ] {
        let reply = call(&tester, method, &request);
        assert_code(&reply, 403, "permission_denied");
    }
    assert!(secret.join("file").exists());
    assert!(!exists(&secret.join("new")));
    assert!(!exists(&envd.home().join("stolen")));
    // Root may.
    assert_eq!(
        call(
            &envd.client(),
            "Stat",
            &json!({"path": p(&secret.join("file"))})
        )
        .status,
        200
    );

    // What the tester creates is the tester's; `~` is the tester's home.
    let made = call(&tester, "MakeDir", &json!({"path": "~/mine/inner"}));
    assert_eq!(made.status, 200, "{}", made.text());
    assert_eq!(made.json()["entry"]["owner"], "tester");
    for dir in ["mine", "mine/inner"] {
        let meta = std::fs::metadata(envd.home().join(dir)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (TESTER_UID, TESTER_UID), "{dir}");
    }

    // An unknown user is unauthenticated.
    assert_code(
        &call(
            &envd.client().user("nobody-here"),
            "Stat",
            &json!({"path": "/"}),
        ),
        401,
        "unauthenticated",
    );
}

/// (type, name) of the filesystem events among `frames`.
fn events_of(frames: &[common::Frame]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter_map(|f| f.json.get("filesystem"))
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_owned(),
                e["name"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn watch_dir_recursive_sees_new_subdirectories() {
    let envd = Envd::start();
    let dir = envd.root_home().join("watched");
    std::fs::create_dir(&dir).unwrap();
    let mut stream = envd.client().server_stream(
        "filesystem.Filesystem/WatchDir",
        &json!({"path": p(&dir), "recursive": true}),
        &[("keepalive-ping-interval", "30")],
    );
    assert_eq!(stream.status, 200);
    let first = stream.next().unwrap();
    assert!(first.json.get("start").is_some(), "{:?}", first.json);

    std::fs::create_dir(dir.join("sub")).unwrap();
    let mut seen = Vec::new();
    // The create event of `sub` comes once `sub` itself is watched.
    while !seen.contains(&("EVENT_TYPE_CREATE".to_owned(), "sub".to_owned())) {
        let frame = stream.next().expect("stream ended");
        seen.extend(events_of(&[frame]));
    }
    std::fs::write(dir.join("sub/f.txt"), b"data").unwrap();
    std::fs::rename(dir.join("sub/f.txt"), dir.join("sub/g.txt")).unwrap();
    std::fs::remove_file(dir.join("sub/g.txt")).unwrap();
    let wanted = [
        ("EVENT_TYPE_CREATE", "sub/f.txt"),
        ("EVENT_TYPE_WRITE", "sub/f.txt"),
        ("EVENT_TYPE_RENAME", "sub/f.txt"),
        ("EVENT_TYPE_CREATE", "sub/g.txt"),
        ("EVENT_TYPE_REMOVE", "sub/g.txt"),
    ];
    while !seen.contains(&("EVENT_TYPE_REMOVE".to_owned(), "sub/g.txt".to_owned())) {
        let frame = stream.next().expect("stream ended");
        assert!(!frame.end, "stream ended: {:?}", frame.json);
        seen.extend(events_of(&[frame]));
    }
    for (kind, name) in wanted {
        assert!(
            seen.contains(&(kind.to_owned(), name.to_owned())),
            "missing {kind} {name} in {seen:?}"
        );
    }
}

#[test]
fn watch_dir_keepalive_entries_and_errors() {
    let envd = Envd::start();
    let dir = envd.root_home().join("w");
    std::fs::create_dir(&dir).unwrap();
    let mut stream = envd.client().server_stream(
        "filesystem.Filesystem/WatchDir",
        &json!({"path": p(&dir), "includeEntry": true}),
        &[("keepalive-ping-interval", "1")],
    );
    assert!(stream.next().unwrap().json.get("start").is_some());
    let started = Instant::now();
    let keepalive = stream.next().unwrap();
    assert!(
        keepalive.json.get("keepalive").is_some(),
        "{:?}",
        keepalive.json
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Not recursive: a file in a subdirectory is not reported, one in the root is, with its entry.
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/hidden"), b"").unwrap();
    std::fs::write(dir.join("top.txt"), b"x").unwrap();
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["name"] == "top.txt") {
        let frame = stream.next().unwrap();
        if let Some(event) = frame.json.get("filesystem") {
            seen.push(event.clone());
        }
    }
    assert!(seen.iter().all(|e| e["name"] != "sub/hidden"), "{seen:?}");
    let create = seen.iter().find(|e| e["name"] == "top.txt").unwrap();
    assert_eq!(create["type"], "EVENT_TYPE_CREATE");
    assert_eq!(create["entry"]["path"], p(&dir.join("top.txt")));

    // Errors end the stream with a Connect error.
    for (path, code) in [
        (p(&dir.join("missing")), "not_found"),
        (p(&dir.join("top.txt")), "invalid_argument"),
    ] {
        let frames = envd
            .client()
            .server_stream(
                "filesystem.Filesystem/WatchDir",
                &json!({"path": path}),
                &[],
            )
            .collect();
        let last = frames.last().expect("no frames");
        assert!(last.end);
        assert_eq!(last.json["error"]["code"], code, "{:?}", last.json);
    }
    let secret = envd.dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let frames = envd
        .client()
        .user("tester")
        .server_stream(
            "filesystem.Filesystem/WatchDir",
            &json!({"path": p(&secret)}),
            &[],
        )
        .collect();
    assert_eq!(
        frames.last().unwrap().json["error"]["code"],
        "permission_denied"
    );
}

#[test]
fn polling_watcher_returns_and_clears_events() {
    let envd = Envd::start();
    let client = envd.client();
    let dir = envd.root_home().join("polled");
    std::fs::create_dir(&dir).unwrap();
    let created = call(
        &client,
        "CreateWatcher",
        &json!({"path": p(&dir), "recursive": true}),
    );
    assert_eq!(created.status, 200, "{}", created.text());
    let id = created.json()["watcherId"].as_str().unwrap().to_owned();

    std::fs::create_dir(dir.join("d")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(dir.join("d/file"), b"abc").unwrap();
    let mut events: Vec<Value> = Vec::new();
    wait_for("the watcher's events", || {
        let reply = call(&client, "GetWatcherEvents", &json!({"watcherId": id}));
        assert_eq!(reply.status, 200, "{}", reply.text());
        events.extend(
            reply.json()["events"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        events
            .iter()
            .any(|e| e["name"] == "d/file" && e["type"] == "EVENT_TYPE_WRITE")
    });
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "d" && e["type"] == "EVENT_TYPE_CREATE")
    );
    // Taken events are gone; nothing new happened.
    std::thread::sleep(Duration::from_millis(200));
    let again = call(&client, "GetWatcherEvents", &json!({"watcherId": id}));
    assert_eq!(again.status, 200);
    assert!(
        again.json()["events"]
            .as_array()
            .is_none_or(|e| e.is_empty()),
        "{}",
        again.text()
    );

    // A watched subdirectory renamed inside the tree reports under its new name.
    std::fs::rename(dir.join("d"), dir.join("e")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(dir.join("e/file2"), b"z").unwrap();
    let mut events: Vec<Value> = Vec::new();
    wait_for("events under the new name", || {
        let reply = call(&client, "GetWatcherEvents", &json!({"watcherId": id}));
        events.extend(
            reply.json()["events"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        events
            .iter()
            .any(|e| e["name"] == "e/file2" && e["type"] == "EVENT_TYPE_WRITE")
    });
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "d" && e["type"] == "EVENT_TYPE_RENAME"),
        "{events:?}"
    );
    assert!(events.iter().all(|e| e["name"] != "d/file2"), "{events:?}");

    assert_eq!(
        call(&client, "RemoveWatcher", &json!({"watcherId": id})).status,
        200
    );
    assert_code(
        &call(&client, "RemoveWatcher", &json!({"watcherId": id})),
        404,
        "not_found",
    );
    assert_code(
        &call(&client, "GetWatcherEvents", &json!({"watcherId": id})),
        404,
        "not_found",
    );
    assert_code(
        &call(
            &client,
            "CreateWatcher",
            &json!({"path": p(&dir.join("missing"))}),
        ),
        404,
        "not_found",
    );
}
