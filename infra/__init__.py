"""What runs on the user's machine: the launcher (``launch.py``, ``launcher/``), run review (``review/``),
data tools (``data/``) and the embedded S3 (``s3server.py``). Uses ``brainseg``; never needs torch to launch or review."""
