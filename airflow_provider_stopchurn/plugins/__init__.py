"""The StopChurn page of the Airflow UI.

:mod:`.stopchurn` is the Airflow plugin (registered through the ``airflow.plugins`` entry point): a FastAPI app
mounted in the API server and an external view in the nav. It reads the metadata database; :mod:`.page` turns
what it read, and what the snapshot stores hold, into HTML and imports nothing from Airflow.
"""
