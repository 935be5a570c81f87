-- Roll back a failed replacement: while a job replaces a running engine, the image it ran
-- before; the generation that starts it again is marked so that its own failure stops the
-- game instead of rolling back again.
ALTER TABLE runtime_records
    ADD COLUMN rollback_image_ref text CHECK (rollback_image_ref <> ''),
    ADD COLUMN rolling_back       boolean NOT NULL DEFAULT false;

-- Every unit is labelled with the uid of the database it was created under: a unit with
-- our instance label but another (or no) database uid was not created under this database
-- (a lost volume, a new database) and is never disposed of on the controller's own
-- initiative; it is shown as unowned and left to an operator.
ALTER TABLE controller_identity
    ADD COLUMN uid uuid NOT NULL DEFAULT gen_random_uuid();
