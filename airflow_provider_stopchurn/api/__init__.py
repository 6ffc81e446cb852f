"""Talking to StopChurn (no Airflow import): the HTTP client and the fixed contract of its tables.

* :mod:`.client`: :class:`~.client.StopChurnClient`, the public methods (post updates and events, check the key);
* :mod:`.transport`: one request sent with the session, the masked key, timeouts, retries, backoff and pacing;
* :mod:`.answers`: what StopChurn's answers mean (the acknowledgement, retried statuses, 401/400/413);
* :mod:`.urls`: which base URLs are accepted, and how a URL is quoted without its secrets;
* :mod:`.closing`: the ``with`` block that closes the client (and the sandbox server);
* :mod:`.contract`: the fixed contract of the ``user`` table, checked before anything is sent.
"""
