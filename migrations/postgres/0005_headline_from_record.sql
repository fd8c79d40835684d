-- The headline reads the flag the agent's classifier computed per (namespace, protocol,
-- port) and carried in every record, instead of re-deriving the rule from the family and
-- reach strings: the rule lives in one place (agent/src/classify.rs). The lists still name
-- every listener on the port.
DROP VIEW hidden_ipv4_exposure;
CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port,
       string_agg(DISTINCT shown_as COLLATE "C", ',' ORDER BY shown_as COLLATE "C") AS shown_as,
       string_agg(DISTINCT NULLIF(processes, '') COLLATE "C", ','
                  ORDER BY NULLIF(processes, '') COLLATE "C") AS processes
FROM current_listeners
GROUP BY host, netns, protocol, port
HAVING bool_or(hidden_ipv4_exposure);
