"""The networks (MONAI factory and their encoders), losses, optimisers and schedules, sliding-window
inference, and the self-describing model file (``description`` needs no torch)."""
