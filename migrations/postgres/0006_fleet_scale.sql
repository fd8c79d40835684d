-- Fleet scale; see migrations/sqlite/0006_fleet_scale.sql.
ALTER TABLE host ADD COLUMN live_listeners bigint NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN session_epoch bigint NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN collector text;
UPDATE host SET live_listeners =
    (SELECT count(*) FROM listener l WHERE l.host_id = host.id AND l.valid_to IS NULL);
-- Heartbeats and commits update host rows all the time: with room on each page and no
-- index on the columns they change, PostgreSQL updates them in place (HOT) instead of
-- writing a new index entry per heartbeat. (SQLite has no such cost and keeps an index on
-- last_seen for `hosts`; here a top-N sort of the host table serves it.)
ALTER TABLE host SET (fillfactor = 50);

CREATE TABLE hidden_port (
    host_id   bigint NOT NULL REFERENCES host (id),
    host      text NOT NULL,
    netns     text NOT NULL,
    protocol  text NOT NULL,
    port      integer NOT NULL,
    shown_as  text NOT NULL,
    processes text,
    -- (host, port) first: a delta rebuilds the rows of the ports it touched.
    PRIMARY KEY (host_id, port, protocol, netns)
);
CREATE INDEX hidden_port_port ON hidden_port (port, protocol);
INSERT INTO hidden_port
SELECT l.host_id, h.name, l.netns, l.protocol, l.port,
       string_agg(DISTINCT l.shown_as COLLATE "C", ',' ORDER BY l.shown_as COLLATE "C"),
       string_agg(DISTINCT NULLIF(l.process_names, '') COLLATE "C", ','
                  ORDER BY NULLIF(l.process_names, '') COLLATE "C")
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL
GROUP BY l.host_id, h.name, l.netns, l.protocol, l.port
HAVING bool_or(l.hidden_ipv4_exposure);

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
       now() - h.last_seen
           > make_interval(secs => (SELECT value::float8 FROM setting WHERE key = 'stale_after_seconds')) AS stale,
       h.live_listeners AS listeners,
       h.collector
FROM host h;

CREATE INDEX listener_from ON listener (valid_from);
DROP INDEX listener_host_from;
CREATE INDEX listener_host_port ON listener (host_id, port);
