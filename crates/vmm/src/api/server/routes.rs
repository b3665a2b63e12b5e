//! Routing and body decoding: from a method, a request target and a body to an
//! [`ApiRequest`], or to the fault message Firecracker would give.
//!
//! Pure functions only; the VMM is not involved. A request that fails here is answered 400 by
//! the API thread itself.

use serde::de::DeserializeOwned;

use crate::api::ApiRequest;
use crate::api::models::{InstanceActionInfo, VmStateUpdate};

/// Why a well-framed request is not a valid API call. All are 400 with the message as
/// `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("Invalid request method and/or path: {method} {path}")]
    InvalidPathMethod { method: String, path: String },
    #[error("Empty request body")]
    EmptyBody,
    #[error("GET request cannot have a body.")]
    GetWithBody,
    #[error("The ID cannot be empty.")]
    EmptyId,
    #[error("API Resource IDs can only contain alphanumeric characters and underscores.")]
    InvalidId,
    #[error("The id from the path does not match the id from the body!")]
    IdMismatch,
    /// serde's message, which names the field and the position.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(String),
}

/// Routes one request. The query string and fragment of `target` are ignored; a single
/// trailing slash is tolerated.
pub fn route(method: &str, target: &str, body: &[u8]) -> Result<ApiRequest, RouteError> {
    let path = request_path(target);
    let invalid = || RouteError::InvalidPathMethod {
        method: method.to_owned(),
        path: path.to_owned(),
    };
    if !path.starts_with('/') {
        return Err(invalid());
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();

    if method == "GET" {
        let request = match segments.as_slice() {
            [] => ApiRequest::GetInstanceInfo,
            ["version"] => ApiRequest::GetVersion,
            ["machine-config"] => ApiRequest::GetMachineConfig,
            ["vm", "config"] => ApiRequest::GetVmConfig,
            ["metrics"] => ApiRequest::GetMetrics,
            ["serial"] => ApiRequest::GetSerial,
            _ => return Err(invalid()),
        };
        if !is_blank(body) {
            return Err(RouteError::GetWithBody);
        }
        return Ok(request);
    }

    let request = match (method, segments.as_slice()) {
        ("PUT", ["boot-source"]) => ApiRequest::PutBootSource(decode(body)?),
        ("PUT", ["machine-config"]) => ApiRequest::PutMachineConfig(decode(body)?),
        ("PATCH", ["machine-config"]) => ApiRequest::PatchMachineConfig(decode(body)?),
        ("PUT", ["drives"]) | ("PUT", ["network-interfaces"]) => return Err(RouteError::EmptyId),
        ("PUT", ["drives", id]) => {
            let id = checked_id(id)?;
            let drive: crate::api::models::Drive = decode(body)?;
            same_id(id, &drive.drive_id)?;
            ApiRequest::PutDrive(drive)
        }
        ("PUT", ["network-interfaces", id]) => {
            let id = checked_id(id)?;
            let iface: crate::api::models::NetworkInterface = decode(body)?;
            same_id(id, &iface.iface_id)?;
            ApiRequest::PutNetworkInterface(iface)
        }
        ("PUT", ["vsock"]) => ApiRequest::PutVsock(decode(body)?),
        ("PUT", ["entropy"]) => ApiRequest::PutEntropy(decode(body)?),
        ("PUT", ["serial"]) => ApiRequest::PutSerial(decode(body)?),
        ("PUT", ["logger"]) => ApiRequest::PutLogger(decode(body)?),
        ("PUT", ["metrics"]) => ApiRequest::PutMetrics(decode(body)?),
        ("PUT", ["actions"]) => {
            let action: InstanceActionInfo = decode(body)?;
            ApiRequest::Action(action.action_type)
        }
        ("PATCH", ["vm"]) => {
            let update: VmStateUpdate = decode(body)?;
            ApiRequest::PatchVm(update.state)
        }
        ("PUT", ["snapshot", "create"]) => ApiRequest::CreateSnapshot(decode(body)?),
        ("PUT", ["snapshot", "load"]) => ApiRequest::LoadSnapshot(decode(body)?),
        _ => return Err(invalid()),
    };
    Ok(request)
}

/// The path of an origin-form target (`/a/b?q`) or an absolute-form one
/// (`http://localhost/a/b`), without query or fragment.
fn request_path(target: &str) -> &str {
    let without_query = target.split(['?', '#']).next().unwrap_or_default();
    let Some((_, after_scheme)) = without_query.split_once("://") else {
        return without_query;
    };
    // Absolute form: drop the authority. An empty path means `/`.
    after_scheme
        .find('/')
        .map_or("/", |slash| after_scheme.get(slash..).unwrap_or("/"))
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, RouteError> {
    if is_blank(body) {
        return Err(RouteError::EmptyBody);
    }
    serde_json::from_slice(body).map_err(|err| RouteError::Json(err.to_string()))
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// Firecracker's rule for resource ids in paths.
fn checked_id(id: &str) -> Result<&str, RouteError> {
    if id.is_empty() {
        return Err(RouteError::EmptyId);
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(RouteError::InvalidId);
    }
    Ok(id)
}

fn same_id(from_path: &str, from_body: &str) -> Result<(), RouteError> {
    if from_path == from_body {
        Ok(())
    } else {
        Err(RouteError::IdMismatch)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::api::models::{
        ActionType, BootSource, CacheType, Drive, Entropy, HugePages, LoggerConfig, MachineConfig,
        MachineConfigUpdate, MetricsConfig, NetworkInterface, SerialConfig, VmState, Vsock,
    };

    fn ok(method: &str, target: &str, body: &str) -> ApiRequest {
        match route(method, target, body.as_bytes()) {
            Ok(request) => request,
            Err(err) => panic!("{method} {target} {body}: {err}"),
        }
    }

    fn err(method: &str, target: &str, body: &str) -> RouteError {
        match route(method, target, body.as_bytes()) {
            Ok(request) => panic!("{method} {target} {body}: expected an error, got {request:?}"),
            Err(err) => err,
        }
    }

    #[test]
    fn test_route_every_get() {
        assert_eq!(ok("GET", "/", ""), ApiRequest::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", ""), ApiRequest::GetVersion);
        assert_eq!(
            ok("GET", "/machine-config", ""),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(ok("GET", "/vm/config", ""), ApiRequest::GetVmConfig);
        assert_eq!(ok("GET", "/metrics", ""), ApiRequest::GetMetrics);
        assert_eq!(ok("GET", "/serial", ""), ApiRequest::GetSerial);
    }

    #[test]
    fn test_route_put_boot_source() {
        let body = r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#;
        assert_eq!(
            ok("PUT", "/boot-source", body),
            ApiRequest::PutBootSource(BootSource {
                kernel_image_path: "/k".into(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: None,
            })
        );
    }

    #[test]
    fn test_route_put_and_patch_machine_config() {
        let body = r#"{"vcpu_count":2,"mem_size_mib":256,"huge_pages":"2M"}"#;
        assert_eq!(
            ok("PUT", "/machine-config", body),
            ApiRequest::PutMachineConfig(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                huge_pages: HugePages::Size2M,
                ..MachineConfig::default()
            })
        );
        assert_eq!(
            ok("PATCH", "/machine-config", r#"{"smt":true}"#),
            ApiRequest::PatchMachineConfig(MachineConfigUpdate {
                smt: Some(true),
                ..MachineConfigUpdate::default()
            })
        );
    }

    #[test]
    fn test_route_put_drive() {
        let body = r#"{"drive_id":"rootfs","path_on_host":"/r.ext4","is_root_device":true,
                       "cache_type":"Writeback"}"#;
        assert_eq!(
            ok("PUT", "/drives/rootfs", body),
            ApiRequest::PutDrive(Drive {
                drive_id: "rootfs".into(),
                path_on_host: Some("/r.ext4".into()),
                is_root_device: true,
                is_read_only: None,
                partuuid: None,
                cache_type: CacheType::Writeback,
                io_engine: None,
                rate_limiter: None,
                layers: None,
            })
        );
    }

    #[test]
    fn test_route_put_network_interface() {
        let body = r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":1500}"#;
        assert_eq!(
            ok("PUT", "/network-interfaces/eth0", body),
            ApiRequest::PutNetworkInterface(NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "tap0".into(),
                guest_mac: None,
                mtu: Some(1500),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
        );
    }

    #[test]
    fn test_route_other_puts() {
        assert_eq!(
            ok("PUT", "/vsock", r#"{"guest_cid":3,"uds_path":"/v.sock"}"#),
            ApiRequest::PutVsock(Vsock {
                guest_cid: 3,
                uds_path: "/v.sock".into(),
                vsock_id: None,
            })
        );
        assert_eq!(
            ok("PUT", "/entropy", "{}"),
            ApiRequest::PutEntropy(Entropy::default())
        );
        assert_eq!(
            ok("PUT", "/serial", r#"{"serial_out_path":"/s.log"}"#),
            ApiRequest::PutSerial(SerialConfig {
                serial_out_path: Some("/s.log".into()),
                ring_buffer_bytes: None,
            })
        );
        assert_eq!(
            ok("PUT", "/logger", r#"{"level":"Info"}"#),
            ApiRequest::PutLogger(LoggerConfig {
                level: Some("Info".into()),
                ..LoggerConfig::default()
            })
        );
        assert_eq!(
            ok("PUT", "/metrics", r#"{"metrics_path":"/m.json"}"#),
            ApiRequest::PutMetrics(MetricsConfig {
                metrics_path: "/m.json".into()
            })
        );
    }

    #[test]
    fn test_route_actions_and_vm_state() {
        for (name, action) in [
            ("InstanceStart", ActionType::InstanceStart),
            ("SendCtrlAltDel", ActionType::SendCtrlAltDel),
            ("FlushMetrics", ActionType::FlushMetrics),
        ] {
            let body = format!(r#"{{"action_type":"{name}"}}"#);
            assert_eq!(ok("PUT", "/actions", &body), ApiRequest::Action(action));
        }
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state":"Paused"}"#),
            ApiRequest::PatchVm(VmState::Paused)
        );
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state":"Resumed"}"#),
            ApiRequest::PatchVm(VmState::Resumed)
        );
    }

    #[test]
    fn test_route_query_trailing_slash_and_absolute_form_are_tolerated() {
        assert_eq!(ok("GET", "/version?verbose=1", ""), ApiRequest::GetVersion);
        assert_eq!(ok("GET", "/vm/config/", ""), ApiRequest::GetVmConfig);
        assert_eq!(
            ok("GET", "http://localhost/version", ""),
            ApiRequest::GetVersion
        );
        assert_eq!(
            ok("GET", "http://localhost", ""),
            ApiRequest::GetInstanceInfo
        );
        assert_eq!(ok("GET", "/#frag", ""), ApiRequest::GetInstanceInfo);
    }

    #[test]
    fn test_route_unknown_path_and_wrong_method_are_invalid() {
        assert_eq!(
            err("GET", "/foo", "").to_string(),
            "Invalid request method and/or path: GET /foo"
        );
        assert_eq!(
            err("DELETE", "/drives/a?x=1", "").to_string(),
            "Invalid request method and/or path: DELETE /drives/a"
        );
        for (method, target) in [
            ("GET", "/boot-source"),
            ("GET", "/drives/a"),
            ("POST", "/actions"),
            ("PATCH", "/boot-source"),
            ("PUT", "/version"),
            ("PUT", "/vm"),
            ("PUT", "/drives/a/b"),
            ("PUT", "/drives//a"),
            ("GET", "/vm"),
            ("GET", "/vm/config/x"),
            ("GET", "//version"),
            ("GET", "*"),
            ("GET", ""),
            ("GET", "version"),
        ] {
            assert!(
                matches!(
                    err(method, target, "{}"),
                    RouteError::InvalidPathMethod { .. }
                ),
                "{method} {target}"
            );
        }
    }

    #[test]
    fn test_route_empty_body_is_rejected() {
        for (method, target) in [
            ("PUT", "/boot-source"),
            ("PUT", "/machine-config"),
            ("PATCH", "/machine-config"),
            ("PUT", "/drives/a"),
            ("PUT", "/network-interfaces/a"),
            ("PUT", "/vsock"),
            ("PUT", "/entropy"),
            ("PUT", "/serial"),
            ("PUT", "/logger"),
            ("PUT", "/metrics"),
            ("PUT", "/actions"),
            ("PATCH", "/vm"),
        ] {
            assert_eq!(
                err(method, target, ""),
                RouteError::EmptyBody,
                "{method} {target}"
            );
            assert_eq!(err(method, target, " \r\n"), RouteError::EmptyBody);
        }
        assert_eq!(RouteError::EmptyBody.to_string(), "Empty request body");
    }

    #[test]
    fn test_route_get_with_body_is_rejected() {
        assert_eq!(err("GET", "/version", "{}"), RouteError::GetWithBody);
        // Whitespace is no body.
        assert_eq!(ok("GET", "/version", "\r\n"), ApiRequest::GetVersion);
    }

    #[test]
    fn test_route_ids_are_checked_and_must_match_the_body() {
        let drive = r#"{"drive_id":"a","is_root_device":false}"#;
        assert_eq!(err("PUT", "/drives", drive), RouteError::EmptyId);
        assert_eq!(err("PUT", "/drives/", drive), RouteError::EmptyId);
        assert_eq!(err("PUT", "/drives/a-b", drive), RouteError::InvalidId);
        assert_eq!(err("PUT", "/drives/%61", drive), RouteError::InvalidId);
        assert_eq!(err("PUT", "/drives/b", drive), RouteError::IdMismatch);
        assert_eq!(
            RouteError::IdMismatch.to_string(),
            "The id from the path does not match the id from the body!"
        );
        // Ids are case-sensitive.
        assert_eq!(err("PUT", "/drives/A", drive), RouteError::IdMismatch);
        let iface = r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#;
        assert_eq!(
            err("PUT", "/network-interfaces", iface),
            RouteError::EmptyId
        );
        assert_eq!(
            err("PUT", "/network-interfaces/eth.0", iface),
            RouteError::InvalidId
        );
        assert_eq!(
            err("PUT", "/network-interfaces/eth1", iface),
            RouteError::IdMismatch
        );
    }

    #[test]
    fn test_route_json_errors_name_the_problem() {
        let unknown = err(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"/k","foo":1}"#,
        );
        let message = unknown.to_string();
        assert!(
            message.contains("unknown field `foo`, expected one of"),
            "{message}"
        );
        assert!(message.contains("`kernel_image_path`"), "{message}");

        let missing = err("PUT", "/boot-source", r#"{"boot_args":"x"}"#).to_string();
        assert!(
            missing.contains("missing field `kernel_image_path`"),
            "{missing}"
        );

        let syntax = err("PUT", "/machine-config", "{\"vcpu_count\" 1}").to_string();
        assert!(syntax.contains("line 1 column"), "{syntax}");

        let wrong_type = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":"2","mem_size_mib":1}"#,
        );
        assert!(
            wrong_type.to_string().contains("invalid type"),
            "{wrong_type}"
        );

        let bad_enum = err("PUT", "/actions", r#"{"action_type":"Reboot"}"#).to_string();
        assert!(bad_enum.contains("unknown variant `Reboot`"), "{bad_enum}");

        let not_utf8 = route("PUT", "/vsock", b"{\"uds_path\":\"\xff\"}").unwrap_err();
        assert!(matches!(not_utf8, RouteError::Json(_)));
    }

    proptest! {
        #[test]
        fn prop_route_never_panics(
            method in prop_oneof![Just("GET".to_owned()), Just("PUT".to_owned()), Just("PATCH".to_owned()), "[A-Z]{0,7}"],
            target in "[ -~]{0,40}",
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = route(&method, &target, &body);
        }

        #[test]
        fn prop_mismatched_drive_ids_are_always_refused(
            path_id in "[A-Za-z0-9_]{1,12}",
            body_id in "[A-Za-z0-9_]{1,12}",
        ) {
            let body = format!(r#"{{"drive_id":"{body_id}","is_root_device":false}}"#);
            let result = route("PUT", &format!("/drives/{path_id}"), body.as_bytes());
            if path_id == body_id {
                prop_assert!(matches!(result, Ok(ApiRequest::PutDrive(_))));
            } else {
                prop_assert_eq!(result, Err(RouteError::IdMismatch));
            }
        }
    }
}
