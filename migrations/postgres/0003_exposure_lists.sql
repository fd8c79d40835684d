-- Lists in byte order (COLLATE "C", as SQLite sorts) whatever the database locale, and
-- owner lists without empty entries: the same text on both databases.
DROP VIEW hidden_ipv4_exposure;
CREATE VIEW hidden_ipv4_exposure AS
SELECT host, netns, protocol, port,
       string_agg(DISTINCT shown_as COLLATE "C", ',' ORDER BY shown_as COLLATE "C") AS shown_as,
       string_agg(DISTINCT NULLIF(processes, '') COLLATE "C", ','
                  ORDER BY NULLIF(processes, '') COLLATE "C") AS processes
FROM current_listeners
GROUP BY host, netns, protocol, port
HAVING count(*) FILTER (WHERE family = 'ipv4') = 0
   AND count(*) FILTER (WHERE reach_ipv4 IN ('any', 'specific')) > 0;
