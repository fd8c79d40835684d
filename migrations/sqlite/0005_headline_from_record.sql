-- The headline reads the flag the agent's classifier computed per (namespace, protocol,
-- port) and carried in every record, instead of re-deriving the rule from the family and
-- reach strings: the rule lives in one place (agent/src/classify.rs). The lists still name
-- every listener on the port.
DROP VIEW hidden_ipv4_exposure;
CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port,
       group_concat(DISTINCT shown_as ORDER BY shown_as) AS shown_as,
       group_concat(DISTINCT NULLIF(processes, '') ORDER BY NULLIF(processes, '')) AS processes
FROM current_listeners
GROUP BY host, netns, protocol, port
HAVING max(hidden_ipv4_exposure) = 1;
