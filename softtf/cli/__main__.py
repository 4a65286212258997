"""``python -m softtf.cli``: the ``softtf`` command (how ``--nproc`` starts its workers)."""
import sys

from . import main

sys.exit(main())
