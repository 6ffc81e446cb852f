"""The StopChurn page of the Airflow UI.

:mod:`.stopchurn` is the Airflow plugin (registered through the ``airflow.plugins`` entry point): a FastAPI app
mounted in the API server and an external view in the nav (:mod:`.app` reads the metadata database). The rest
imports nothing from Airflow: :mod:`.model` holds what the page shows, :mod:`.stores` reads the snapshot stores the
runs used, :mod:`.page` renders the page (its style sheet and script in ``static/``) and :mod:`.chart` its charts;
:mod:`.formatting` writes times, counts, states and links into Airflow.
"""
