//! The control API: HTTP/1.1 + JSON on a unix socket, Firecracker's resources and bodies.
//!
//! The API thread parses HTTP, routes, and decodes bodies (answering malformed requests
//! itself); every well-formed request becomes an [`ApiRequest`] sent to the VMM thread, which
//! answers with an [`ApiResponse`]. The API thread never touches the VM.

use std::sync::mpsc;

pub mod models;
pub mod server;

use models::{
    ActionType, BootSource, Drive, Entropy, LoggerConfig, MachineConfig, MachineConfigUpdate,
    MetricsConfig, NetworkInterface, SerialConfig, SnapshotCreateParams, SnapshotLoadParams,
    VmState, Vsock,
};

/// A decoded request for the VMM thread.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /`
    GetInstanceInfo,
    /// `GET /version`
    GetVersion,
    /// `GET /machine-config`
    GetMachineConfig,
    /// `GET /vm/config`
    GetVmConfig,
    /// `GET /metrics` (Wrenn's addition: the counters as JSON)
    GetMetrics,
    /// `GET /serial` (Wrenn's addition: the console ring buffer as bytes)
    GetSerial,
    PutBootSource(BootSource),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutDrive(Drive),
    PutNetworkInterface(NetworkInterface),
    PutVsock(Vsock),
    PutEntropy(Entropy),
    PutSerial(SerialConfig),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    Action(ActionType),
    PatchVm(VmState),
    /// `PUT /snapshot/create`
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`
    LoadSnapshot(SnapshotLoadParams),
}

/// The VMM thread's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// 204, no body.
    NoContent,
    /// 200 with a JSON body.
    Json(serde_json::Value),
    /// 200 with an `application/octet-stream` body.
    Bytes(Vec<u8>),
    /// 400 with `{"fault_message": message}`.
    Fault(String),
}

/// One request in flight: the API thread waits on `reply` before reading the next request.
#[derive(Debug)]
pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: mpsc::Sender<ApiResponse>,
}
