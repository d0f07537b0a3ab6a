"""Weight files in and out: safetensors, torchvision and Keras checkpoints, the published-weights
table, downloads, and building a preset with its weights."""
