"""``import lfm2edge.distributed``: encoding across machines with Ray (the ``distributed`` extra).

The code lives in ``lfm2edge.runtime.distributed``; this module names its public API.
"""

from lfm2edge.runtime.distributed import *  # noqa: F403
from lfm2edge.runtime.distributed import __all__ as __all__
