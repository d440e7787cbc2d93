"""``python -m mae_ray <job> [options]``: the ``mae-ray`` command, for hosts where its script is not on PATH
(e.g. a ``ray job submit`` entrypoint)."""

import sys

from mae_ray.cli import main

sys.exit(main())
