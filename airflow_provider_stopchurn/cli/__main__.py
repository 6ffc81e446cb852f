"""``python -m airflow_provider_stopchurn.cli``: the ``stopchurn`` command."""

import sys

from airflow_provider_stopchurn.cli import main

if __name__ == "__main__":  # importing this module (a package walk) runs nothing
    sys.exit(main())
