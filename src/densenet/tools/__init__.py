"""Looking at models: the layer summary and the speed benchmark."""
