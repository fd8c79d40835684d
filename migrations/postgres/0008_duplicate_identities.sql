-- Duplicate identities: connections refused because another agent (another instance id)
-- held the host's session with the same certificate (docs/protocol.md, "One host, one
-- agent"). How many, the last one's time and peer address; written at most every 10 s
-- per host by the collector that refused them. Constant defaults: no row is rewritten.
-- The view is replaced in place (new columns at the end), so its grants stay.
ALTER TABLE host ADD COLUMN duplicate_refusals bigint NOT NULL DEFAULT 0;
ALTER TABLE host ADD COLUMN duplicate_last_at timestamptz;
ALTER TABLE host ADD COLUMN duplicate_last_peer text;

CREATE OR REPLACE VIEW hosts AS
SELECT h.name AS host,
       h.os_hostname,
       h.agent_version,
       h.first_seen,
       h.last_seen,
       h.last_snapshot_at,
       now() - h.last_seen
           > make_interval(secs => (SELECT value::float8 FROM setting WHERE key = 'stale_after_seconds')) AS stale,
       h.live_listeners AS listeners,
       h.collector,
       h.duplicate_refusals,
       h.duplicate_last_at,
       h.duplicate_last_peer
FROM host h;
