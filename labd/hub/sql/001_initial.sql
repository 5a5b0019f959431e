-- labd hub schema, version 1: made for querying (one row per run, descriptor, event, sample).
-- Every table is keyed by the document uid, so a replayed document is stored once.

CREATE TABLE runs (
    uid          text PRIMARY KEY,              -- the start document's uid
    cell         text NOT NULL,
    plan_name    text,
    protocol     text,
    campaign     text,
    sample_id    text,
    start_time   timestamptz NOT NULL,
    stop_uid     text UNIQUE,                   -- the stop document's uid, once it arrived
    stop_time    timestamptz,
    exit_status  text,                          -- success, fail, abort; NULL while running
    reason       text,
    num_events   jsonb,                         -- {stream: count} from the stop document
    metadata     jsonb NOT NULL,                -- the whole start document
    stop_doc     jsonb
);
CREATE INDEX runs_start_time ON runs (start_time);
CREATE INDEX runs_campaign ON runs (campaign, start_time);
CREATE INDEX runs_protocol ON runs (protocol, start_time);

CREATE TABLE descriptors (
    uid           text PRIMARY KEY,
    run_uid       text NOT NULL REFERENCES runs (uid),
    name          text NOT NULL,                -- the stream: primary, baseline, sample, ...
    time          timestamptz NOT NULL,
    data_keys     jsonb NOT NULL,
    configuration jsonb,
    doc           jsonb NOT NULL
);
CREATE INDEX descriptors_run ON descriptors (run_uid);

CREATE TABLE events (
    uid            text PRIMARY KEY,
    descriptor_uid text NOT NULL REFERENCES descriptors (uid),
    run_uid        text NOT NULL,
    stream         text NOT NULL,
    seq_num        integer NOT NULL,
    time           timestamptz NOT NULL,
    data           jsonb NOT NULL,
    timestamps     jsonb NOT NULL,
    filled         jsonb
);
CREATE INDEX events_descriptor ON events (descriptor_uid, seq_num);
CREATE INDEX events_run ON events (run_uid, time);

-- One row per sample (the sample convention of labd.samples). Compositions are JSONB maps
-- {element: atomic fraction}: the elements change from one campaign to the next, so a column per
-- element would mean a migration per campaign. Query an element with
-- (target_composition->>'Fe')::float; the GIN indexes serve containment and key tests.
CREATE TABLE samples (
    sample_id            text PRIMARY KEY,
    run_uid              text NOT NULL REFERENCES runs (uid),
    event_uid            text NOT NULL,
    cell                 text NOT NULL,
    campaign             text,
    protocol             text,
    time                 timestamptz NOT NULL,
    target_composition   jsonb NOT NULL,
    measured_composition jsonb NOT NULL,
    dosed_mg             jsonb NOT NULL,
    anneal_c             double precision,
    anneal_s             double precision,
    property_name        text,
    property_value       double precision,
    property_unit        text,
    extra                jsonb NOT NULL
);
CREATE INDEX samples_campaign ON samples (campaign, time);
CREATE INDEX samples_target ON samples USING gin (target_composition);
CREATE INDEX samples_measured ON samples USING gin (measured_composition);

-- Documents that are not queried by field (resource, datum, stream_resource, stream_datum).
CREATE TABLE other_documents (
    uid     text PRIMARY KEY,
    name    text NOT NULL,
    run_uid text,
    time    timestamptz,
    doc     jsonb NOT NULL
);
CREATE INDEX other_documents_run ON other_documents (run_uid);
