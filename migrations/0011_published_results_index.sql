-- The relay's check of what Redis may have lost reads the results published in the last few
-- minutes, and retention deletes those published before its horizon: both by publish time. Without
-- an index both scanned the whole table, which grows with retention, at every start, new term and
-- Redis outage, until the check outgrew the statement timeout and the relay published nothing.
CREATE INDEX job_results_published_idx ON job_results (published_at) WHERE published_at IS NOT NULL;
