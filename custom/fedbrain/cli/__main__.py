"""``python -m fedbrain.cli`` is the ``fedbrain`` command."""

import sys

from fedbrain.cli.main import main

sys.exit(main())
