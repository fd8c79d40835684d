-- listenscope store, SQLite edition. migrations/postgres/ builds the same tables and
-- views with the same column names and meanings (booleans are 0/1 here).
-- Times are UTC text 'YYYY-MM-DD HH:MM:SS.SSS', comparable with datetime('now', …).

-- One row per host (agent identity = client certificate name).
CREATE TABLE host (
    id               INTEGER PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    os_hostname      TEXT NOT NULL DEFAULT '',
    agent_version    TEXT NOT NULL DEFAULT '',
    first_seen       TEXT NOT NULL,
    last_seen        TEXT NOT NULL,
    last_snapshot_at TEXT,
    -- The agent session whose messages are committed, and the last committed sequence:
    -- written in the same transaction as the data, so a retry after a crash is detected.
    session_id       BLOB,
    committed_seq    INTEGER NOT NULL DEFAULT 0
);

-- Every version of every listener. A row is current while valid_to IS NULL. A change to
-- the classification, owners' names or attribution closes the row ('changed') and opens
-- a new version; a listener that disappears is closed ('closed'). first_seen is when this
-- listener's lifetime began and is carried across its versions.
CREATE TABLE listener (
    id                   INTEGER PRIMARY KEY,
    host_id              INTEGER NOT NULL REFERENCES host (id),
    lkey                 TEXT NOT NULL,
    netns                TEXT NOT NULL,
    netns_inode          INTEGER NOT NULL,
    protocol             TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
    family               TEXT NOT NULL CHECK (family IN ('ipv4', 'ipv6')),
    address              TEXT NOT NULL,
    port                 INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    interface            TEXT,
    v6only               INTEGER CHECK (v6only IN (0, 1)),
    reach_ipv4           TEXT NOT NULL,
    reach_ipv6           TEXT NOT NULL,
    latent               INTEGER NOT NULL,
    shown_as             TEXT NOT NULL,
    netstat_proto        TEXT NOT NULL,
    trap                 INTEGER NOT NULL,
    hidden_ipv4_exposure INTEGER NOT NULL,
    process_names        TEXT NOT NULL,
    processes            TEXT NOT NULL,
    container_runtime    TEXT,
    container_id         TEXT,
    pod_uid              TEXT,
    unit                 TEXT,
    cgroup               TEXT,
    uid                  INTEGER NOT NULL,
    freebind             INTEGER,
    transparent          INTEGER,
    source               TEXT NOT NULL,
    sockets              INTEGER NOT NULL,
    material_hash        INTEGER NOT NULL,
    full_hash            INTEGER NOT NULL,
    first_seen           TEXT NOT NULL,
    valid_from           TEXT NOT NULL,
    valid_to             TEXT,
    end_reason           TEXT CHECK (end_reason IN ('changed', 'closed'))
);

CREATE UNIQUE INDEX listener_live_key ON listener (host_id, lkey) WHERE valid_to IS NULL;
CREATE INDEX listener_live_port ON listener (port, protocol) WHERE valid_to IS NULL;
CREATE INDEX listener_host_from ON listener (host_id, valid_from);
CREATE INDEX listener_to ON listener (valid_to) WHERE valid_to IS NOT NULL;

-- Tunables the views read. stale_after_seconds: a host not heard from for longer is stale.
CREATE TABLE setting (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO setting (key, value) VALUES ('stale_after_seconds', '300');

-- Hosts: last contact and whether they went silent.
CREATE VIEW hosts AS
SELECT h.name AS host,
       h.os_hostname,
       h.agent_version,
       h.first_seen,
       h.last_seen,
       h.last_snapshot_at,
       (julianday('now') - julianday(h.last_seen)) * 86400.0
           > CAST((SELECT value FROM setting WHERE key = 'stale_after_seconds') AS REAL) AS stale,
       (SELECT count(*) FROM listener l WHERE l.host_id = h.id AND l.valid_to IS NULL) AS listeners
FROM host h;

-- One row per live listener.
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

-- The headline: ports reachable over IPv4 from off the host (any or a specific
-- non-loopback address) while netstat shows only IPv6 lines (tcp6/udp6) for them.
CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port,
       group_concat(DISTINCT shown_as) AS shown_as,
       group_concat(DISTINCT processes) AS processes
FROM current_listeners
GROUP BY host, netns, protocol, port
HAVING sum(family = 'ipv4') = 0
   AND sum(reach_ipv4 IN ('any', 'specific')) > 0;

-- Events: a listener opened, changed (new values shown) or closed, with its time.
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

-- One row per listener lifetime: when it was first seen and when it went away (NULL:
-- still there), with its last known values.
CREATE VIEW listener_history AS
SELECT h.name AS host,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.reach_ipv4, l.reach_ipv6, l.shown_as, l.trap, l.process_names AS processes,
       l.first_seen,
       CASE WHEN l.end_reason = 'closed' THEN l.valid_to END AS gone_at
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL OR l.end_reason = 'closed';
