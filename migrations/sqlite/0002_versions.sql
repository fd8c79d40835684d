-- Point-in-time: every version of every listener with its validity interval. The state
-- as of time T is: SELECT * FROM listener_versions
--   WHERE valid_from <= T AND (valid_to IS NULL OR valid_to > T)
CREATE VIEW listener_versions AS
SELECT h.name AS host,
       l.netns, l.netns_inode, l.protocol, l.family, l.address, l.port, l.interface, l.v6only,
       l.reach_ipv4, l.reach_ipv6, l.latent, l.shown_as, l.netstat_proto, l.trap,
       l.hidden_ipv4_exposure,
       l.process_names AS processes,
       l.processes AS process_details,
       l.container_runtime, l.container_id, l.pod_uid, l.unit, l.cgroup,
       l.uid, l.freebind, l.transparent, l.source, l.sockets,
       l.first_seen, l.valid_from, l.valid_to, l.end_reason
FROM listener l
JOIN host h ON h.id = l.host_id;

-- Deterministic lists, the same on both databases.
DROP VIEW hidden_ipv4_exposure;
CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port,
       group_concat(DISTINCT shown_as ORDER BY shown_as) AS shown_as,
       group_concat(DISTINCT processes ORDER BY processes) AS processes
FROM current_listeners
GROUP BY host, netns, protocol, port
HAVING sum(family = 'ipv4') = 0
   AND sum(reach_ipv4 IN ('any', 'specific')) > 0;
