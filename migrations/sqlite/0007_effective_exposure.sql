-- Effective exposure: what the namespace's own firewall (nftables, iptables) lets through
-- to each listener, per IP version, as the agent decided it (docs/views.md).
--
-- Per listener version: the verdict (open, filtered, restricted, unknown, diverted, n/a),
-- the reason (the deciding rule, the policy, or why it is unknown) and, for restricted,
-- the conditions (the ways in, one per line: the agent and the collector refuse line
-- breaks inside one, so the text splits back exactly). Verdicts and conditions are
-- material (a change is a new version, an event); reasons are refreshed in place.
-- Rows stored before this migration get `unknown`, with a reason that says so (the same
-- text as listenscope_core::record::STORED_BEFORE_VERDICTS). Constant defaults: adding
-- the columns rewrites no row.
ALTER TABLE listener ADD COLUMN effective_ipv4 TEXT NOT NULL DEFAULT 'unknown';
ALTER TABLE listener ADD COLUMN effective_ipv6 TEXT NOT NULL DEFAULT 'unknown';
ALTER TABLE listener ADD COLUMN effective_reason_ipv4 TEXT NOT NULL
    DEFAULT 'stored before the collector recorded firewall verdicts';
ALTER TABLE listener ADD COLUMN effective_reason_ipv6 TEXT NOT NULL
    DEFAULT 'stored before the collector recorded firewall verdicts';
ALTER TABLE listener ADD COLUMN effective_conditions_ipv4 TEXT NOT NULL DEFAULT '';
ALTER TABLE listener ADD COLUMN effective_conditions_ipv6 TEXT NOT NULL DEFAULT '';

-- The headline's firewall side: the effective IPv4 verdict of the port's hidden side (the
-- most permissive among its listeners that accept IPv4 while netstat shows them as IPv6,
-- i.e. its trap sockets), and for `restricted` their conditions (one per line). Rebuilt
-- with the rest of the row, in the same transaction as the listeners. Every stored
-- listener is `unknown` now, so is every stored port.
ALTER TABLE hidden_port ADD COLUMN effective_ipv4 TEXT NOT NULL DEFAULT 'unknown';
ALTER TABLE hidden_port ADD COLUMN effective_conditions_ipv4 TEXT;

-- The views gain columns at their end (PostgreSQL's CREATE OR REPLACE VIEW keeps grants
-- only that way; the same order here). Conditions show as text, ' | ' between ways in,
-- NULL when there are none.
DROP VIEW current_listeners;
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
       l.valid_from AS last_changed,
       l.effective_ipv4, l.effective_ipv6,
       l.effective_reason_ipv4, l.effective_reason_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, char(10), ' | '), '') AS effective_conditions_ipv4,
       NULLIF(replace(l.effective_conditions_ipv6, char(10), ' | '), '') AS effective_conditions_ipv6
FROM listener l
JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL;

DROP VIEW listener_versions;
CREATE VIEW listener_versions AS
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
       NULLIF(replace(l.effective_conditions_ipv4, char(10), ' | '), '') AS effective_conditions_ipv4,
       NULLIF(replace(l.effective_conditions_ipv6, char(10), ' | '), '') AS effective_conditions_ipv6
FROM listener l
JOIN host h ON h.id = l.host_id;

DROP VIEW listener_changes;
CREATE VIEW listener_changes AS
SELECT h.name AS host, 'opened' AS change, l.valid_from AS at,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names AS processes,
       l.effective_ipv4, l.effective_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, char(10), ' | '), '') AS effective_conditions_ipv4,
       NULLIF(replace(l.effective_conditions_ipv6, char(10), ' | '), '') AS effective_conditions_ipv6
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_from = l.first_seen
UNION ALL
SELECT h.name, 'changed', l.valid_from,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names,
       l.effective_ipv4, l.effective_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, char(10), ' | '), ''),
       NULLIF(replace(l.effective_conditions_ipv6, char(10), ' | '), '')
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_from > l.first_seen
UNION ALL
SELECT h.name, 'closed', l.valid_to,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.shown_as, l.reach_ipv4, l.reach_ipv6, l.trap, l.process_names,
       l.effective_ipv4, l.effective_ipv6,
       NULLIF(replace(l.effective_conditions_ipv4, char(10), ' | '), ''),
       NULLIF(replace(l.effective_conditions_ipv6, char(10), ' | '), '')
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.end_reason = 'closed';

DROP VIEW listener_history;
CREATE VIEW listener_history AS
SELECT h.name AS host,
       l.netns, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.reach_ipv4, l.reach_ipv6, l.shown_as, l.trap, l.process_names AS processes,
       l.first_seen,
       CASE WHEN l.end_reason = 'closed' THEN l.valid_to END AS gone_at,
       l.effective_ipv4, l.effective_ipv6
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL OR l.end_reason = 'closed';

DROP VIEW hidden_ipv4_exposure;
CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port, shown_as, processes,
       effective_ipv4,
       replace(effective_conditions_ipv4, char(10), ' | ') AS effective_conditions_ipv4
FROM hidden_port;

-- One row per live listener and IP version whose verdict is not n/a: what the firewall
-- does to each way a client could reach it.
CREATE VIEW effective_exposure AS
SELECT h.name AS host, l.netns, l.protocol, l.port, l.family, l.address, l.shown_as,
       'ipv4' AS ip_version,
       l.effective_ipv4 AS verdict,
       NULLIF(replace(l.effective_conditions_ipv4, char(10), ' | '), '') AS conditions,
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
       NULLIF(replace(l.effective_conditions_ipv6, char(10), ' | '), ''),
       l.effective_reason_ipv6,
       l.hidden_ipv4_exposure,
       l.process_names,
       l.container_runtime, l.container_id, l.pod_uid, l.unit,
       l.first_seen,
       l.valid_from
FROM listener l JOIN host h ON h.id = l.host_id
WHERE l.valid_to IS NULL AND l.effective_ipv6 <> 'n/a';
