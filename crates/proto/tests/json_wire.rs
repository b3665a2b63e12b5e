//! The generated messages speak proto3 JSON the way E2B's SDKs write and read it: camelCase
//! names (snake_case accepted), int64 as strings, bytes as base64, enums by name, oneofs as
//! the member's field, Timestamps as RFC 3339, defaults omitted.
use serde_json::json;
use wrenn_proto::filesystem::{EntryInfo, FileType};
use wrenn_proto::process::{ProcessEvent, StartRequest, StartResponse, process_event};

#[test]
fn start_request_from_the_sdk() {
    let request: StartRequest = serde_json::from_value(json!({
        "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"], "envs": {"A": "1"}, "cwd": "/tmp"},
        "stdin": false,
        "tag": "t1"
    }))
    .unwrap();
    let process = request.process.as_option().unwrap();
    assert_eq!(process.cmd, "/bin/bash");
    assert_eq!(process.args, ["-l", "-c", "echo hi"]);
    assert_eq!(process.envs.get("A").map(String::as_str), Some("1"));
    assert_eq!(process.cwd.as_deref(), Some("/tmp"));
    assert_eq!(request.stdin, Some(false));
    assert_eq!(request.tag.as_deref(), Some("t1"));
    assert!(request.pty.as_option().is_none());
}

#[test]
fn process_events_as_the_sdk_reads_them() {
    let data = StartResponse {
        event: ProcessEvent {
            event: Some(process_event::Event::Data(Box::new(
                process_event::DataEvent {
                    output: Some(process_event::data_event::Output::Stdout(b"hi\n".to_vec())),
                    ..Default::default()
                },
            ))),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&data).unwrap(),
        json!({"event": {"data": {"stdout": "aGkK"}}})
    );
    let end = StartResponse {
        event: ProcessEvent {
            event: Some(process_event::Event::End(Box::new(
                process_event::EndEvent {
                    exit_code: 0,
                    exited: true,
                    status: "exit status 0".into(),
                    ..Default::default()
                },
            ))),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&end).unwrap(),
        json!({"event": {"end": {"exited": true, "status": "exit status 0"}}})
    );
}

#[test]
fn entry_info_wire_form() {
    let entry: EntryInfo = serde_json::from_value(json!({
        "name": "a.txt", "type": "FILE_TYPE_FILE", "path": "/tmp/a.txt", "size": "12",
        "modifiedTime": "2026-01-02T03:04:05.5Z", "symlink_target": "/x"
    }))
    .unwrap();
    assert_eq!(entry.size, 12);
    assert_eq!(entry.r#type, FileType::FILE_TYPE_FILE);
    assert_eq!(entry.symlink_target.as_deref(), Some("/x"));
    let back = serde_json::to_value(&entry).unwrap();
    assert_eq!(back["size"], json!("12"));
    assert_eq!(back["type"], json!("FILE_TYPE_FILE"));
    assert_eq!(back["modifiedTime"], json!("2026-01-02T03:04:05.500Z"));
}
