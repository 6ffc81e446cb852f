"""The event engine (no Airflow import): rows of a source sent once each to StopChurn's event route.

* ``options``: :class:`~airflow_provider_stopchurn.events.options.EventOptions`, what shapes a run, validated;
* ``ledger``: the stream's state: the ledger of the event keys delivered, the watermark and the window a run reads;
* ``encode``: one event per source row, as the JSON text sent, with its key and watermark;
* ``plan``: what a run sends: rows before the window, after the clock or delivered already dropped, then chunked;
* ``engine``: the run: lock, finish an unfinished plan, plan, deliver, commit (:func:`run_events` lives here);
* ``settle``: a refused or stuck plan's acknowledged events join the ledger, the rest is read again;
* ``summary``: what a run delivered, for the task log, XCom and the history.
"""
