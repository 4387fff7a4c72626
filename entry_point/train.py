"""SageMaker's training entry script: ``python train.py --data_uri s3://... --output_uri s3://...``.

The program is :mod:`brainseg.commands.train` (also ``brainseg-train``); this file is what SageMaker runs.
"""

import sys

from brainseg.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
