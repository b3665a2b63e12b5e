-- The control plane's state (SQLite). Same tables and meaning as migrations/postgres:
-- timestamps are unix milliseconds, maps JSON text.
CREATE TABLE hosts (
    id TEXT PRIMARY KEY NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    version TEXT NOT NULL,
    vcpus_total BIGINT NOT NULL,
    memory_mib_total BIGINT NOT NULL,
    vcpus_used BIGINT NOT NULL,
    memory_mib_used BIGINT NOT NULL,
    sandboxes_running BIGINT NOT NULL,
    storage TEXT,
    last_heartbeat_at BIGINT NOT NULL,
    registered_at BIGINT NOT NULL
);

CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY NOT NULL,
    template TEXT NOT NULL,
    state TEXT NOT NULL,
    host_id TEXT,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    -- What the create request asked for (0: the template's), to tell a retry from a clash.
    requested_vcpus BIGINT NOT NULL,
    requested_memory_mib BIGINT NOT NULL,
    timeout_seconds BIGINT NOT NULL,
    envd_access_token TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    expires_at BIGINT,
    error TEXT
);
CREATE INDEX sandboxes_list ON sandboxes (created_at DESC, id DESC);
CREATE INDEX sandboxes_state_list ON sandboxes (state, created_at DESC, id DESC);
CREATE INDEX sandboxes_template ON sandboxes (template, created_at DESC);
CREATE INDEX sandboxes_host ON sandboxes (host_id, state);

-- One row per metadata entry, for `metadata.KEY=VALUE` filters.
CREATE TABLE sandbox_metadata (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, key)
);
CREATE INDEX sandbox_metadata_kv ON sandbox_metadata (key, value);

CREATE TABLE templates (
    name TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    source_sandbox_id TEXT,
    size_bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE template_hosts (
    template TEXT NOT NULL REFERENCES templates (name) ON DELETE CASCADE,
    host_id TEXT NOT NULL,
    PRIMARY KEY (template, host_id)
);
CREATE INDEX template_hosts_host ON template_hosts (host_id);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    sandbox_id TEXT,
    host_id TEXT,
    detail TEXT NOT NULL,
    request_id TEXT
);
CREATE INDEX events_sandbox ON events (sandbox_id, at);
