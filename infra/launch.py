"""The launcher's command: ``python infra/launch.py [train|predict|tune|iam-policy|status|logs|stop|attach|jobs] ...``.

The same program as ``brainseg-launch`` (``infra/launcher/cli.py``); run it with the venv's python
after ``make setup``, from the repository root or from any other folder.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # The repository root instead of infra/, so `infra` is the package (not this folder's modules).
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from infra.launcher.cli import main

    sys.exit(main())
