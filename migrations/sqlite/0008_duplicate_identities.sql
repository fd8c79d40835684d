-- Duplicate identities: connections refused because another agent (another instance id)
-- held the host's session with the same certificate (docs/protocol.md, "One host, one
-- agent"). How many, the last one's time and peer address; written at most every 10 s
-- per host by the collector that refused them. Constant defaults: no row is rewritten.
ALTER TABLE host ADD COLUMN duplicate_refusals INTEGER NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN duplicate_last_at TEXT;
ALTER TABLE host ADD COLUMN duplicate_last_peer TEXT;

-- The hosts view gains the three at its end (the same order as PostgreSQL's).
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
       h.collector,
       h.duplicate_refusals,
       h.duplicate_last_at,
       h.duplicate_last_peer
FROM host h;
