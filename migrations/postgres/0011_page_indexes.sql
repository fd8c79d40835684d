-- The web UI's fleet pages; see migrations/sqlite/0011_page_indexes.sql. Text columns the
-- reports sort in byte order (COLLATE "C") are indexed in that collation.
DROP INDEX hidden_port_port;
CREATE INDEX hidden_port_port_rank ON hidden_port (
    port,
    (CASE effective_ipv4 WHEN 'open' THEN 5 WHEN 'restricted' THEN 4 WHEN 'diverted' THEN 3 WHEN 'unknown' THEN 2
              WHEN 'filtered' THEN 1 WHEN 'n/a' THEN 0 ELSE 2 END) DESC,
    host COLLATE "C", netns COLLATE "C", protocol);
CREATE INDEX hidden_port_port_host ON hidden_port (port, host COLLATE "C", netns COLLATE "C", protocol);
CREATE INDEX hidden_port_rank ON hidden_port (
    (CASE effective_ipv4 WHEN 'open' THEN 5 WHEN 'restricted' THEN 4 WHEN 'diverted' THEN 3 WHEN 'unknown' THEN 2
              WHEN 'filtered' THEN 1 WHEN 'n/a' THEN 0 ELSE 2 END) DESC,
    host COLLATE "C", netns COLLATE "C", protocol, port);

-- Hosts by live listeners, most first. Not by last_seen: heartbeats update it all the
-- time, and with an index on it those updates could not stay in place (HOT, see
-- 0006_fleet_scale.sql); the default order (silent longest first) is a top-N sort of the
-- host table. live_listeners changes only when a message opens or closes listeners.
CREATE INDEX host_live_listeners ON host (live_listeners DESC, name COLLATE "C");
