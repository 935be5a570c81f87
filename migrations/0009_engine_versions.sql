-- The engine-version registry. A unique violation is answered 409 naming the constraint that was
-- violated (engine_versions_version_key or engine_versions_image_ref_key), read from the error,
-- never from a prior SELECT: two racing creates give one 201 and one 409.
CREATE TABLE engine_versions (
    id         bigserial PRIMARY KEY,
    version    text NOT NULL CONSTRAINT engine_versions_version_key UNIQUE
               CONSTRAINT engine_versions_version_chk CHECK (version ~ '^[A-Za-z0-9._-]{1,64}$'),
    image_ref  text NOT NULL CONSTRAINT engine_versions_image_ref_key UNIQUE
               CONSTRAINT engine_versions_image_ref_chk CHECK (image_ref <> '' AND length(image_ref) <= 255),
    status     text NOT NULL DEFAULT 'active'
               CONSTRAINT engine_versions_status_chk CHECK (status IN ('active', 'deprecated', 'disabled')),
    notes      text NOT NULL DEFAULT '' CHECK (length(notes) <= 4000),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The registered version of the game's image (empty when unregistered), on the record, in the
-- REST view and in snapshots.
ALTER TABLE runtime_records ADD COLUMN engine_version text NOT NULL DEFAULT '';
