"""``python -m airflow_provider_stopchurn.cli``: the ``stopchurn`` command."""

import sys

from airflow_provider_stopchurn.cli import main

sys.exit(main())
