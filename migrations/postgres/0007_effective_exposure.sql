-- Effective exposure; see migrations/sqlite/0007_effective_exposure.sql for what the
-- columns hold. Constant defaults: PostgreSQL adds the columns without rewriting the
-- table. The views are replaced in place (CREATE OR REPLACE VIEW, new columns at the end):
-- a dropped view would lose the GRANTs of a read-only role (docs/postgres.md).
ALTER TABLE listener ADD COLUMN effective_ipv4 text NOT NULL DEFAULT 'unknown';
ALTER TABLE listener ADD COLUMN effective_ipv6 text NOT NULL DEFAULT 'unknown';
ALTER TABLE listener ADD COLUMN effective_reason_ipv4 text NOT NULL
    DEFAULT 'stored before the collector recorded firewall verdicts';
ALTER TABLE listener ADD COLUMN effective_reason_ipv6 text NOT NULL
    DEFAULT 'stored before the collector recorded firewall verdicts';
ALTER TABLE listener ADD COLUMN effective_conditions_ipv4 text NOT NULL DEFAULT '';
ALTER TABLE listener ADD COLUMN effective_conditions_ipv6 text NOT NULL DEFAULT '';

ALTER TABLE hidden_port ADD COLUMN effective_ipv4 text NOT NULL DEFAULT 'unknown';
ALTER TABLE hidden_port ADD COLUMN effective_conditions_ipv4 text;

CREATE OR REPLACE VIEW current_listeners AS
SELECT h.name AS host,
       l.netns, l.netns_inode, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.reach_ipv4, l.reach_ipv6, l.latent, l.shown_as, l.netstat_proto, l.trap,
       l.hidden_ipv4_exposure,
       l.process_names AS processes,
       l.processes AS process_details,
       l.container_runtime, l.container_id, l.pod_uid, l.unit, l.cgroup,
       l.uid, l.freebind, l.transparent, l.source, l.sockets,
       l.first_seen,
       l.valid_from AS last_changed,
       l.effective_ipv4, l.effective_ipv6,
       l.effective_reason_ipv4, l.effective_reason_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, chr(10), ' | '), '') AS effective_conditions_ipv4,
       NULLIF(replace(l.effective_conditions_ipv6, chr(10), ' | '), '') AS effective_conditions_ipv6
FROM listener l
JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL;

CREATE OR REPLACE VIEW listener_versions AS
SELECT h.name AS host,
       l.netns, l.netns_inode, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.reach_ipv4, l.reach_ipv6, l.latent, l.shown_as, l.netstat_proto, l.trap,
       l.hidden_ipv4_exposure,
       l.process_names AS processes,
       l.processes AS process_details,
       l.container_runtime, l.container_id, l.pod_uid, l.unit, l.cgroup,
       l.uid, l.freebind, l.transparent, l.source, l.sockets,
       l.first_seen, l.valid_from, l.valid_to, l.end_reason,
       l.effective_ipv4, l.effective_ipv6,
       l.effective_reason_ipv4, l.effective_reason_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, chr(10), ' | '), '') AS effective_conditions_ipv4,
       NULLIF(replace(l.effective_conditions_ipv6, chr(10), ' | '), '') AS effective_conditions_ipv6
FROM listener l
JOIN host h ON h.id = l.host_id;

CREATE OR REPLACE VIEW listener_changes AS
SELECT h.name AS host, 'opened' AS change, l.valid_from AS at,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names AS processes,
       l.effective_ipv4, l.effective_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, chr(10), ' | '), '') AS effective_conditions_ipv4,
       NULLIF(replace(l.effective_conditions_ipv6, chr(10), ' | '), '') AS effective_conditions_ipv6
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_from = l.first_seen
UNION ALL
SELECT h.name, 'changed', l.valid_from,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names,
       l.effective_ipv4, l.effective_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, chr(10), ' | '), ''),
       NULLIF(replace(l.effective_conditions_ipv6, chr(10), ' | '), '')
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_from > l.first_seen
UNION ALL
SELECT h.name, 'closed', l.valid_to,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names,
       l.effective_ipv4, l.effective_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, chr(10), ' | '), ''),
       NULLIF(replace(l.effective_conditions_ipv6, chr(10), ' | '), '')
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.end_reason = 'closed';

CREATE OR REPLACE VIEW listener_history AS
SELECT h.name AS host,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.reach_ipv4, l.reach_ipv6, l.shown_as, l.trap, l.process_names AS processes,
       l.first_seen,
       CASE WHEN l.end_reason = 'closed' THEN l.valid_to END AS gone_at,
       l.effective_ipv4, l.effective_ipv6
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL OR l.end_reason = 'closed';

CREATE OR REPLACE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port, shown_as, processes,
       effective_ipv4,
       replace(effective_conditions_ipv4, chr(10), ' | ') AS effective_conditions_ipv4
FROM hidden_port;

-- One row per live listener and IP version whose verdict is not n/a: what the firewall
-- does to each way a client could reach it.
CREATE VIEW effective_exposure AS
SELECT h.name AS host, l.netns, l.protocol, l.port, l.family, l.address, l.shown_as,
       'ipv4' AS ip_version,
       l.effective_ipv4 AS verdict,
       NULLIF(replace(l.effective_conditions_ipv4, chr(10), ' | '), '') AS conditions,
       l.effective_reason_ipv4 AS reason,
       l.hidden_ipv4_exposure,
       l.process_names AS processes,
       l.container_runtime, l.container_id, l.pod_uid, l.unit,
       l.first_seen,
       l.valid_from AS last_changed
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL AND l.effective_ipv4 <> 'n/a'
UNION ALL
SELECT h.name, l.netns, l.protocol, l.port, l.family, l.address, l.shown_as,
       'ipv6',
       l.effective_ipv6,
       NULLIF(replace(l.effective_conditions_ipv6, chr(10), ' | '), ''),
       l.effective_reason_ipv6,
       l.hidden_ipv4_exposure,
       l.process_names,
       l.container_runtime, l.container_id, l.pod_uid, l.unit,
       l.first_seen,
       l.valid_from
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL AND l.effective_ipv6 <> 'n/a';
