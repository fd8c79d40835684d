-- Which fingerprint scheme the stored material_hash/full_hash columns use. Databases
-- written before this migration hold the old one ('fxhash-serde-json'); the collector
-- recomputes the fingerprints of live rows from their stored columns when it opens a
-- database whose scheme is not its own, then records its scheme here
-- (docs/fingerprints.md).
INSERT INTO setting (key, value) VALUES ('fingerprint_scheme', 'fxhash-serde-json');
