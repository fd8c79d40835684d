-- Owner lists skip listeners without owners (no empty entries), the same on both databases.
DROP VIEW hidden_ipv4_exposure;
CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port,
       group_concat(DISTINCT shown_as ORDER BY shown_as) AS shown_as,
       group_concat(DISTINCT NULLIF(processes, '') ORDER BY NULLIF(processes, '')) AS processes
FROM current_listeners
GROUP BY host, netns, protocol, port
HAVING sum(family = 'ipv4') = 0
   AND sum(reach_ipv4 IN ('any', 'specific')) > 0;
