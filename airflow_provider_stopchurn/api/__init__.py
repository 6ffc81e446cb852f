"""Talking to StopChurn (no Airflow import): the HTTP client and the fixed contract of its tables."""
