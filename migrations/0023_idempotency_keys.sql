-- A REST job sent again with the same Idempotency-Key (a retry after its answer was lost) is the same job:
-- the operation of the first is answered, nothing is asked twice. A key is its token's own (actor), and is
-- remembered as long as the operation log keeps the operation.
ALTER TABLE runtime_operations ADD COLUMN idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 128);
CREATE UNIQUE INDEX runtime_operations_idempotency_key ON runtime_operations (actor, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
