"""Where the packaged configs are, whichever way mtl was installed."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The configs/ folder: inside the package for a wheel install, beside it in a checkout or editable install."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"mtl's configs are missing: looked in {_PACKAGE / 'configs'} and {_PACKAGE.parent / 'configs'}")
