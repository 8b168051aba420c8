"""unic: distill any set of pretrained vision backbones into one universal student encoder."""

__version__ = "0.1.0"

__all__ = ["__version__", "export_student", "load_student"]

# The public API is imported on first use, so `import unic_cli` (and `unic --help`) never imports torch.
_LAZY = {"export_student": "unic_cli.export", "load_student": "unic_cli.export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unic_cli' has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion in a notebook lists the lazy names too
    return sorted({*globals(), *_LAZY})
