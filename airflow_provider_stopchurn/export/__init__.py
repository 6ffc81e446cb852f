"""The historical export (no Airflow import).

A table written as StopChurn's historical-upload files and recorded as the update path's baseline.
"""
