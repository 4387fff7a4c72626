"""The prediction job's entry script: ``python predict.py --model s3://... --data_uri s3://... --output_uri s3://...``.

The program is :mod:`brainseg.commands.predict` (also ``brainseg-predict``); this file is what SageMaker runs.
"""

import sys

from brainseg.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
