"""The historical export (no Airflow import).

A table written as StopChurn's historical-upload files and recorded as the update path's baseline:

- ``engine``: the run (lock the table, read the source, write the files, commit them as the baseline);
- ``options``: what shapes one export; ``summary``: what it wrote;
- ``replace``: a snapshot the store holds already (refused unless allowed; its unfinished plan settled and the
  rows the export lacks kept);
- ``folder``: where a run's files go; ``files``: the part files and the manifest, fenced by the table's lease.
"""
