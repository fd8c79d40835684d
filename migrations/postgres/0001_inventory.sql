-- listenscope store, PostgreSQL edition: the same tables and views, with the same column
-- names and meanings, as migrations/sqlite (native types here: boolean, timestamptz,
-- jsonb).

-- One row per host (agent identity = client certificate name).
CREATE TABLE host (
    id               bigserial PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    os_hostname      text NOT NULL DEFAULT '',
    agent_version    text NOT NULL DEFAULT '',
    first_seen       timestamptz NOT NULL,
    last_seen        timestamptz NOT NULL,
    last_snapshot_at timestamptz,
    -- The agent session whose messages are committed, and the last committed sequence:
    -- written in the same transaction as the data, so a retry after a crash is detected.
    session_id       bytea,
    committed_seq    bigint NOT NULL DEFAULT 0
);

-- Every version of every listener; see migrations/sqlite/0001_inventory.sql.
CREATE TABLE listener (
    id                   bigserial PRIMARY KEY,
    host_id              bigint NOT NULL REFERENCES host (id),
    lkey                 text NOT NULL,
    netns                text NOT NULL,
    netns_inode          bigint NOT NULL,
    protocol             text NOT NULL CHECK (protocol IN ('tcp', 'udp')),
    family               text NOT NULL CHECK (family IN ('ipv4', 'ipv6')),
    address              text NOT NULL,
    port                 integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    interface            text,
    v6only               boolean,
    reach_ipv4           text NOT NULL,
    reach_ipv6           text NOT NULL,
    latent               boolean NOT NULL,
    shown_as             text NOT NULL,
    netstat_proto        text NOT NULL,
    trap                 boolean NOT NULL,
    hidden_ipv4_exposure boolean NOT NULL,
    process_names        text NOT NULL,
    processes            jsonb NOT NULL,
    container_runtime    text,
    container_id         text,
    pod_uid              text,
    unit                 text,
    cgroup               text,
    uid                  bigint NOT NULL,
    freebind             boolean,
    transparent          boolean,
    source               text NOT NULL,
    sockets              integer NOT NULL,
    material_hash        bigint NOT NULL,
    full_hash            bigint NOT NULL,
    first_seen           timestamptz NOT NULL,
    valid_from           timestamptz NOT NULL,
    valid_to             timestamptz,
    end_reason           text CHECK (end_reason IN ('changed', 'closed'))
);

CREATE UNIQUE INDEX listener_live_key ON listener (host_id, lkey) WHERE valid_to IS NULL;
CREATE INDEX listener_live_port ON listener (port, protocol) WHERE valid_to IS NULL;
CREATE INDEX listener_host_from ON listener (host_id, valid_from);
CREATE INDEX listener_to ON listener (valid_to) WHERE valid_to IS NOT NULL;

CREATE TABLE setting (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO setting (key, value) VALUES ('stale_after_seconds', '300');

CREATE VIEW hosts AS
SELECT h.name AS host,
       h.os_hostname,
       h.agent_version,
       h.first_seen,
       h.last_seen,
       h.last_snapshot_at,
       now() - h.last_seen
           > make_interval(secs => (SELECT value::float8 FROM setting WHERE key = 'stale_after_seconds')) AS stale,
       (SELECT count(*) FROM listener l WHERE l.host_id = h.id AND l.valid_to IS NULL) AS listeners
FROM host h;

CREATE VIEW current_listeners AS
SELECT h.name AS host,
       l.netns, l.netns_inode, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.reach_ipv4, l.reach_ipv6, l.latent, l.shown_as, l.netstat_proto, l.trap,
       l.hidden_ipv4_exposure,
       l.process_names AS processes,
       l.processes AS process_details,
       l.container_runtime, l.container_id, l.pod_uid, l.unit, l.cgroup,
       l.uid, l.freebind, l.transparent, l.source, l.sockets,
       l.first_seen,
       l.valid_from AS last_changed
FROM listener l
JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL;

CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port,
       string_agg(DISTINCT shown_as, ',' ORDER BY shown_as) AS shown_as,
       string_agg(DISTINCT processes, ',' ORDER BY processes) AS processes
FROM current_listeners
GROUP BY host, netns, protocol, port
HAVING count(*) FILTER (WHERE family = 'ipv4') = 0
   AND count(*) FILTER (WHERE reach_ipv4 IN ('any', 'specific')) > 0;

CREATE VIEW listener_changes AS
SELECT h.name AS host, 'opened' AS change, l.valid_from AS at,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names AS processes
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_from = l.first_seen
UNION ALL
SELECT h.name, 'changed', l.valid_from,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_from > l.first_seen
UNION ALL
SELECT h.name, 'closed', l.valid_to,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.end_reason = 'closed';

CREATE VIEW listener_history AS
SELECT h.name AS host,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.reach_ipv4, l.reach_ipv6, l.shown_as, l.trap, l.process_names AS processes,
       l.first_seen,
       CASE WHEN l.end_reason = 'closed' THEN l.valid_to END AS gone_at
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL OR l.end_reason = 'closed';
