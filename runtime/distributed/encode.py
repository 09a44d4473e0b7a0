"""The encoder actor: one GGUF encoder per Ray actor, mapping a block of documents to their vectors.

Ray Data builds each actor once (``__init__`` loads the model, with as many llama.cpp threads as the
CPUs Ray reserved for the actor) and then calls it on block after block. A block comes back as it
went in (``id``, ``text``, ``metadata``) with an ``embedding`` column added (``arrow_vectors``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lfm2edge.runtime.core.errors import ModelFileError
from lfm2edge.runtime.core.settings import ModelKind
from lfm2edge.runtime.distributed.arrow_vectors import from_vectors
from lfm2edge.runtime.distributed.ray_support import require_ray

if TYPE_CHECKING:
    import pyarrow as pa


def assigned_cpus() -> int:
    """The CPUs Ray reserved for this actor (Ray pins no cores, so the machine's count would oversubscribe)."""
    ray = require_ray()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return max(1, int(cpus))


class DocumentEncoder:
    """A Ray Data callable class: ``map_batches(DocumentEncoder, fn_constructor_kwargs=...)``.

    ``identity`` is the model identity the driver read (the GGUF's, with ``weight_kernel``'s load option):
    an actor whose node holds a different file at the same path refuses to start instead of writing
    vectors of another model.
    """

    def __init__(self, model_path: str, identity: str, exact: bool = True, weight_kernel: str | None = None):
        from lfm2edge.runtime.core.encoders import load  # in the actor's process only
        from lfm2edge.runtime.core.llama import weight_kernel_options
        from lfm2edge.runtime.storage.documents import model_identity

        self.encoder = load(model_path, n_threads=assigned_cpus(), exact=exact,
                            **weight_kernel_options(weight_kernel))
        found = model_identity(self.encoder)
        if found != identity:
            self.encoder.close()
            raise ModelFileError(
                f"{model_path} on this node is another model (identity {found}) than on the driver "
                f"({identity}); copy the same GGUF to every node"
            )
        self.late_interaction = self.encoder.kind is ModelKind.LATE_INTERACTION

    def __call__(self, block: pa.Table) -> pa.Table:
        vectors = self.encoder.encode_document(block.column("text").to_pylist())
        return block.append_column("embedding", from_vectors(vectors, self.late_interaction, self.encoder.dim))
