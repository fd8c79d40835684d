-- Fleet scale: what the fleet questions need is maintained at ingest time, in the same
-- transaction as the listeners, instead of being aggregated from every live row per
-- question (docs/scale.md).

-- Live listeners per host (the `hosts` view's `listeners`), the connection that holds the
-- host's session (its epoch is bumped by every accepted Hello: a write from an older
-- connection, on this or another collector, is refused), and which collector holds it.
ALTER TABLE host ADD COLUMN live_listeners INTEGER NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN collector TEXT;
UPDATE host SET live_listeners =
    (SELECT count(*) FROM listener l WHERE l.host_id = host.id AND l.valid_to IS NULL);
CREATE INDEX host_last_seen ON host (last_seen);

-- The headline, one row per (host, namespace, protocol, port) reachable over IPv4 although
-- netstat shows only IPv6 lines for it; rewritten for the ports a message touches. It
-- carries the host's name (which never changes for a host id), so the view needs no join
-- and a fleet-wide count reads this table alone.
CREATE TABLE hidden_port (
    host_id   INTEGER NOT NULL REFERENCES host (id),
    host      TEXT NOT NULL,
    netns     TEXT NOT NULL,
    protocol  TEXT NOT NULL,
    port      INTEGER NOT NULL,
    shown_as  TEXT NOT NULL,
    processes TEXT,
    -- (host, port) first: a delta rebuilds the rows of the ports it touched.
    PRIMARY KEY (host_id, port, protocol, netns)
) WITHOUT ROWID;
CREATE INDEX hidden_port_port ON hidden_port (port, protocol);
INSERT INTO hidden_port
SELECT l.host_id, h.name, l.netns, l.protocol, l.port,
       group_concat(DISTINCT l.shown_as ORDER BY l.shown_as),
       group_concat(DISTINCT NULLIF(l.process_names, '') ORDER BY NULLIF(l.process_names, ''))
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL
GROUP BY l.host_id, h.name, l.netns, l.protocol, l.port
HAVING max(l.hidden_ipv4_exposure) = 1;

DROP VIEW hidden_ipv4_exposure;
CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port, shown_as, processes
FROM hidden_port;

DROP VIEW hosts;
CREATE VIEW hosts AS
SELECT h.name AS host,
       h.os_hostname,
       h.agent_version,
       h.first_seen,
       h.last_seen,
       h.last_snapshot_at,
       (julianday('now') - julianday(h.last_seen)) * 86400.0
           > CAST((SELECT value FROM setting WHERE key = 'stale_after_seconds') AS REAL) AS stale,
       h.live_listeners AS listeners,
       h.collector
FROM host h;

-- History by time window, fleet-wide (`diff`), and a host's versions of one port.
CREATE INDEX listener_from ON listener (valid_from);
DROP INDEX listener_host_from;
CREATE INDEX listener_host_port ON listener (host_id, port);
