"""What a forward needs that does not depend on the tokens, built once and reused while the weights stay the same.

Decoding at batch 1 is dispatch-bound: rebuilding a block's weight views, re-stacking (and fusing) the parallel
tail's weights and recomputing their window bounds at every token costs more than the layers' arithmetic. A model
keeps these in a `Prepared` store, keyed by what they are ("block", i) or ("tail", start, fuse).

Staleness: the store remembers a signature of the parameters (storage address and in-place version counter of each)
and empties itself when `refresh()` sees a different one, so an optimizer step, `load_state_dict`, `init_weights` or
`model.to(...)` invalidates it. The model refreshes at the start of every forward and decoding step (`GPT.embed`).

Autograd: with grad enabled nothing is stored and nothing stored is used: training must see fresh stacks that carry
the gradient to the parameters (a stored stack's graph would not outlive one backward). So entries built under
`no_grad` or in inference mode never enter autograd, and the two modes can share them.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, TypeVar

import torch

T = TypeVar("T")


class Prepared:
    def __init__(self):
        self._signature: tuple | None = None
        self._items: dict[Hashable, object] = {}

    def refresh(self, parameters: Iterable[torch.Tensor]) -> None:
        """Empty the store if any of the model's parameters moved or changed in place since the last refresh."""
        parameters = tuple(parameters)
        try:
            signature = tuple((p.data_ptr(), p._version) for p in parameters)
        except RuntimeError:  # inference tensors have no version counter: a change in place would go unseen
            if any(p.is_inference() for p in parameters):
                raise ValueError("the model's parameters are inference tensors (the model was built or loaded under "
                                 "torch.inference_mode): build and load it outside, then run it under "
                                 "inference_mode") from None
            raise
        if signature != self._signature:
            self._items.clear()
            self._signature = signature

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The stored value of `key`, built by `build()` on first use; with grad enabled, always built afresh."""
        if torch.is_grad_enabled():
            return build()
        if key not in self._items:
            self._items[key] = build()
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)
