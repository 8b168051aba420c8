"""unic: distill any set of pretrained vision backbones into one universal student encoder."""

__version__ = "0.1.0"
