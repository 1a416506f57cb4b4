"""Random-number-generator state for exact resume.

:func:`capture_rng_state` gathers the global generators a training run draws from: Python's
``random``, NumPy's global generator and torch's CPU (and CUDA) generators;
:func:`restore_rng_state` puts them back. The state is made of tensors and builtin values
only, so checkpoints holding it still load with ``torch.load(weights_only=True)``.

Where the state lives in a checkpoint:

* ``checkpoint["hest2sge_rng"]``: these global generators, written by
  :class:`~hest2sge.models.base.SpotModel` and restored when a fit resumes
  (``trainer.fit(..., ckpt_path=...)``; loading weights for inference leaves them alone).
  Dropout, in-model augmentation and the loader's patch augmentation in the main process
  draw from them.
* the :class:`~hest2sge.data.SpotDataModule` entry: the training loader's own
  ``torch.Generator`` (shuffling; worker processes are seeded from it, so their patch
  augmentation follows it too).

Together they make a resumed run equal an uninterrupted one bit for bit on CPU (with
``num_workers=0`` or non-persistent workers: persistent workers keep generator streams inside
their processes that no checkpoint can capture).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

#: Version of the layout of the captured state.
RNG_STATE_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of the global random generators of this process.

    Returns:
        A dict of tensors and builtin values (safe for ``weights_only`` loading).
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "version": RNG_STATE_VERSION,
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state`.

    Args:
        state: The captured state.

    Raises:
        ValueError: when the state has an unknown layout.
    """
    version = state.get("version") if isinstance(state, dict) else None
    if version != RNG_STATE_VERSION:
        raise ValueError(
            f"unknown RNG state layout (version {version!r}); expected {RNG_STATE_VERSION}"
        )
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], np.asarray(npst["keys"], dtype=np.uint32),
                         int(npst["pos"]), int(npst["has_gauss"]),
                         float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
