-- The agent's watch mode (Hello.watch, Heartbeat.watch; docs/protocol.md, "Watch mode"):
-- how it learns of listeners that open and close, in its text form (`doorbell`,
-- `polling(3s)`, `interval(10s)`), why it is not `doorbell`, and since when the host
-- reports this mode (the Hello or heartbeat that changed it, collector clock). NULL: the
-- agent does not report one (older than the field). Written at each Hello and when a
-- heartbeat reports another mode; no existing row is rewritten.
-- The view is replaced in place (new columns at the end), so its grants stay.
ALTER TABLE host ADD COLUMN watch_mode text;
ALTER TABLE host ADD COLUMN watch_reason text;
ALTER TABLE host ADD COLUMN watch_since timestamptz;

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
       h.duplicate_last_peer,
       h.watch_mode,
       h.watch_reason,
       h.watch_since
FROM host h;
