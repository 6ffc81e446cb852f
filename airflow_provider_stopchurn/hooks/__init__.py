"""Airflow hooks of the StopChurn provider (``airflow_provider_stopchurn.hooks.stopchurn.StopChurnHook``)."""
