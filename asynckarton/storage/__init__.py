"""Where resource bytes live: the ``Storage`` protocol and its two implementations.

``S3Storage`` talks to any S3 API through one reused aiobotocore client; ``LocalStorage``
keeps objects as files in a directory. Both satisfy the same contract suite.
"""

from asynckarton.storage._base import ObjectVersion, Storage, UploadResult
from asynckarton.storage._local import LocalStorage
from asynckarton.storage._s3 import S3Storage

__all__ = [
    "LocalStorage",
    "ObjectVersion",
    "S3Storage",
    "Storage",
    "UploadResult",
]
