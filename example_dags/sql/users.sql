-- StopChurn's `user` table wants two nested objects per row; dotted aliases build them from flat columns.
SELECT
    id,
    email,
    first_name AS "firstName",
    last_name AS "lastName",
    status,
    signed_up_at AS "signedUpAt",
    marketing_email AS "marketingPreferences.email",
    marketing_sms AS "marketingPreferences.phone",
    system_email AS "systemPreferences.email",
    system_sms AS "systemPreferences.phone"
FROM users
