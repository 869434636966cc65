"""Where resource bytes live: the ``Storage`` protocol and its two implementations.

``S3Storage`` talks to any S3 API through one reused aiobotocore client; ``LocalStorage``
keeps objects as files in a directory. Both satisfy the same contract suite.

``S3Storage`` is imported on first use (PEP 562): aiobotocore, botocore and aiohttp
take longer to import than the rest of the package, and a process that never builds an
S3 storage (the command line's ``status``, the embedded mode) does not need them.
"""

import typing

from asynckarton.storage._base import ObjectVersion, Storage, UploadResult
from asynckarton.storage._local import LocalStorage

if typing.TYPE_CHECKING:
    from asynckarton.storage._s3 import S3Storage

__all__ = [
    "LocalStorage",
    "ObjectVersion",
    "S3Storage",
    "Storage",
    "UploadResult",
]


def __getattr__(name: str) -> object:
    """Import ``S3Storage`` (and with it aiobotocore) the first time it is asked for."""
    if name == "S3Storage":
        from asynckarton.storage._s3 import S3Storage

        globals()[name] = S3Storage  # later lookups find it without this hook
        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, ``S3Storage`` included before it is imported."""
    return sorted({*globals(), *__all__})
