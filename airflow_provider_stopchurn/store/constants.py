"""Names shared by the store, the lock and the engine: the file format version and the meta columns.

Every meta column starts with :data:`~airflow_provider_stopchurn.source.frame.RESERVED_PREFIX`, which no source
column may.
"""

from __future__ import annotations

#: The newest layout this provider writes; files of a newer version are refused (upgrade the provider).
FORMAT_VERSION = 1
#: Epoch ms at which each key was first delivered (kept in every snapshot).
CREATED_AT = "__sc_created_at"
#: The two halves of a row's hash (a snapshot made by the row-hash diff engine has them).
HASH_1 = "__sc_hash_1"
HASH_2 = "__sc_hash_2"
META_COLUMNS = (CREATED_AT, HASH_1, HASH_2)
#: The change kind of a row in a plan's change set.
OP = "__sc_op"
#: Epoch ms sent as a row's ``updatedAt``.
UPDATED_AT = "__sc_updated_at"
