"""What is sent (no Airflow import).

Canonical rows as StopChurn update records, JSON request bodies and their chunk plan.
"""
