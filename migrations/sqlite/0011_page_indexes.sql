-- The orders the web UI's fleet pages (and the reports behind them) read, as indexes, so
-- that a page of 50 rows walks an index and stops instead of sorting every row the
-- filter selects (docs/ui.md, "Fleet scale"). A deep page (OFFSET) walks index entries
-- only; the other direction of an order reads the same index backwards. The verdict's
-- rank is the expression the reports order by (store::row::rank_sql, checked by a unit
-- test): most permissive first.
--
-- Every index on hidden_port is written with the headline (half of the listeners are
-- hidden ones in scripts/bench-ingest), so only the default orders and the port's are
-- indexed: the whole headline by host or by processes is sorted (a port filter makes
-- that cheap). hidden_port_port (port, protocol) is replaced by hidden_port_port_host.

-- The headline for one port, by verdict (the default) and by host; over every port, by
-- port; the count of one port's rows.
DROP INDEX hidden_port_port;
CREATE INDEX hidden_port_port_rank ON hidden_port (
    port,
    (CASE effective_ipv4 WHEN 'open' THEN 5 WHEN 'restricted' THEN 4 WHEN 'diverted' THEN 3 WHEN 'unknown' THEN 2
              WHEN 'filtered' THEN 1 WHEN 'n/a' THEN 0 ELSE 2 END) DESC,
    host, netns, protocol);
CREATE INDEX hidden_port_port_host ON hidden_port (port, host, netns, protocol);
-- The headline over every port, by verdict (the default).
CREATE INDEX hidden_port_rank ON hidden_port (
    (CASE effective_ipv4 WHEN 'open' THEN 5 WHEN 'restricted' THEN 4 WHEN 'diverted' THEN 3 WHEN 'unknown' THEN 2
              WHEN 'filtered' THEN 1 WHEN 'n/a' THEN 0 ELSE 2 END) DESC,
    host, netns, protocol, port);

-- Hosts: silent longest first (the default, ties by name: the stale hosts are a range of
-- it), and by live listeners, most first.
DROP INDEX host_last_seen;
CREATE INDEX host_last_seen ON host (last_seen, name);
CREATE INDEX host_live_listeners ON host (live_listeners DESC, name);
