-- The agent installation (Hello.instance_id) that holds each host's session, so that
-- collectors sharing one database refuse a second machine with the same certificate as
-- a single collector does (docs/protocol.md, "One host, one agent"). NULL: an agent
-- without one. Not in the hosts view: an identifier of the agent, not of the host.
ALTER TABLE host ADD COLUMN instance_id BLOB;
