"""xentfast: fused, numerically stable softmax cross-entropy for NumPy and CUDA arrays.

One kernel per row computes the max, the log-sum-exp, the loss and the gradient, with
no softmax, log-softmax or one-hot temporaries.  The API speaks TensorFlow
(``softmax_cross_entropy_with_logits``), Keras (``SparseCategoricalCrossentropy``) and
PyTorch (``cross_entropy`` with ``weight``, ``ignore_index``, ``label_smoothing``).
"""

from ._api import (
    cross_entropy,
    cross_entropy_with_grad,
    log_softmax,
    logsumexp,
    softmax,
    softmax_cross_entropy_with_logits,
    sparse_softmax_cross_entropy_with_logits,
)
from ._buffers import empty_cache
from ._dispatch import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from ._linear import linear_cross_entropy, linear_cross_entropy_with_grad
from ._shards import (
    RowTotals,
    ShardStats,
    combine_shard_stats,
    merge_shard_stats,
    shard_grad,
    shard_stats,
)
from ._keras import (
    CategoricalCrossentropy,
    SparseCategoricalCrossentropy,
    categorical_crossentropy,
    sparse_categorical_crossentropy,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "RowTotals",
    "ShardStats",
    "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy",
    "available_backends",
    "categorical_crossentropy",
    "combine_shard_stats",
    "cross_entropy",
    "cross_entropy_with_grad",
    "empty_cache",
    "get_backend",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "log_softmax",
    "merge_shard_stats",
    "logsumexp",
    "set_backend",
    "shard_grad",
    "shard_stats",
    "softmax",
    "softmax_cross_entropy_with_logits",
    "sparse_categorical_crossentropy",
    "sparse_softmax_cross_entropy_with_logits",
    "use_backend",
]
