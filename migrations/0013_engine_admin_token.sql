-- The secret rtmanager hands each unit it creates (ENGINE_ADMIN_TOKEN) and sends as a bearer token
-- with every admin call. Written before the unit is created, so that a controller killed between the
-- create and the next write, or a replica that takes over, still has the token of the unit it finds.
-- Empty: the unit was created without one (by an older rtmanager), and admin calls carry none.
ALTER TABLE runtime_records ADD COLUMN admin_token text NOT NULL DEFAULT '' CHECK (length(admin_token) <= 256);
