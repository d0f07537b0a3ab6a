"""The network and its variants: the paper's DenseNet, its memory-efficient training path,
batch norm across processes, multi-scale features and the preset table. No file I/O here."""
