"""``python -m softtf.bench ...``: ``softtf bench`` without the console script."""
import sys

from .cli import main

sys.exit(main())
