"""The update engine (no Airflow import).

Plan a run, diff it against the snapshot, deliver its chunks, settle what StopChurn acknowledged.
"""
