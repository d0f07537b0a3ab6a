"""Images to tensors: the datasets (built-in digits, CIFAR, SVHN, ImageFolder) and their batches."""
