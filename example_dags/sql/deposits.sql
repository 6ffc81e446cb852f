-- One event per deposit. The operator passes the start of its window as named parameters: `since_ms` (epoch
-- milliseconds) and `since` (a UTC datetime); SQLite writes them :since_ms, PostgreSQL %(since)s.
SELECT
    id AS deposit_id,
    user_id,
    amount,
    created_ms
FROM deposits
WHERE created_ms >= :since_ms
