"""The event engine (no Airflow import): rows of a source sent once each to StopChurn's event route."""
