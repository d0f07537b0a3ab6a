"""One training run end to end: the recipe config, the loop, its saved state and run directory,
evaluation, fine-tuning helpers, multi-process training and plots."""
