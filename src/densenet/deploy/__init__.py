"""From a trained model to a fast or portable artefact: the inference network, export, int8
quantization and prediction on image files."""
