-- ml-connector state: connections, flows, cursors, record links, audit, channels, token cache.

CREATE TABLE connections (
    name        text PRIMARY KEY,
    system      text NOT NULL,
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb,
    secrets     bytea,             -- AES-GCM ciphertext of a JSON object, AAD = connection name
    key_id      text,              -- master key that encrypted ``secrets``
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE flows (
    name               text PRIMARY KEY,
    version            integer NOT NULL,
    definition         jsonb NOT NULL,
    definition_hash    text NOT NULL,
    source_connection  text NOT NULL,
    target_connection  text NOT NULL,
    poll_interval_s    integer NOT NULL,
    enabled            boolean NOT NULL DEFAULT true,
    file               text,
    applied_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE flow_versions (
    name        text NOT NULL,
    version     integer NOT NULL,
    definition  jsonb NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- One row per flow and source entity: the high-water mark and the poll's health.
CREATE TABLE cursors (
    flow            text NOT NULL,
    entity          text NOT NULL,
    value           text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_poll_at    timestamptz,
    last_status     text,
    last_error      text,
    last_count      integer NOT NULL DEFAULT 0,
    PRIMARY KEY (flow, entity)
);

-- Which poller replica polls a flow, until when.
CREATE TABLE flow_leases (
    flow         text PRIMARY KEY,
    owner        text NOT NULL,
    lease_until  timestamptz NOT NULL,
    next_poll_at timestamptz NOT NULL DEFAULT now()
);

-- Content hashes of the last snapshot, for sources without a change column.
CREATE TABLE source_snapshots (
    flow     text NOT NULL,
    entity   text NOT NULL,
    key      text NOT NULL,
    hash     text NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (flow, entity, key)
);

CREATE TABLE record_links (
    flow               text NOT NULL,
    source_entity      text NOT NULL,
    source_key         text NOT NULL,
    target_connection  text NOT NULL,
    target_entity      text NOT NULL,
    target_id          text,
    source_version     text,
    observed_at        timestamptz,
    payload_hash       text,
    last_command_id    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (flow, source_entity, source_key)
);
CREATE INDEX record_links_target ON record_links (target_connection, target_entity, target_id);

CREATE TABLE audit_events (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    flow            text,
    direction       text,          -- e.g. syspro->zoho_crm
    stage           text NOT NULL, -- polled, mapped, written, skipped, failed, dead_lettered, replayed
    status          text NOT NULL, -- ok, insert, update, unchanged, stale, retry, dead, ...
    source_ref      text,          -- system:entity:key
    target_ref      text,          -- system:entity:id
    event_id        text,
    command_id      text,
    message_id      text,
    error_class     text,
    error           text,
    transformation  text,
    actor           text NOT NULL,
    details         jsonb
);
CREATE INDEX audit_events_source ON audit_events (source_ref, at);
CREATE INDEX audit_events_target ON audit_events (target_ref, at);
CREATE INDEX audit_events_failed ON audit_events (at) WHERE error_class IS NOT NULL;
CREATE INDEX audit_events_flow_at ON audit_events (flow, at);

CREATE TABLE webhook_channels (
    channel_id   text PRIMARY KEY,
    connection   text NOT NULL,
    events       text[] NOT NULL,
    token        bytea NOT NULL,  -- encrypted verification token
    key_id       text NOT NULL,
    notify_url   text NOT NULL,
    expires_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    renewed_at   timestamptz
);

CREATE TABLE token_cache (
    connection  text PRIMARY KEY,
    token       bytea NOT NULL,  -- encrypted access token and its context
    key_id      text NOT NULL,
    expires_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
