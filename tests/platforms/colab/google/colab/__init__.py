"""Stand-in for Colab's `google.colab` (colabtools google/colab/__init__.py imports these submodules)."""

from google.colab import auth, drive, runtime, userdata  # noqa: F401

__all__ = ["auth", "drive", "runtime", "userdata"]
__version__ = "0.0.1a2"
