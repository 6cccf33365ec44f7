"""Where checkpoints come from and where Q and K live in them.

- ``base``: the protocols every kind implements (:class:`Source`, :class:`Checkpoint`, :class:`Tensor`);
- ``registry``: :func:`resolve`, which asks each kind of source in turn whether it opens a ``--model``;
- one module per kind: ``hf`` (Hugging Face directories; ``torchbin`` reads their pickled ``.bin``
  safely), ``hub`` (the Hugging Face hub), ``jaxtree`` (orbax and Flax msgpack), ``tinypythia``
  (the embedded model);
- ``known``: the models known by name; ``steps``: ``--steps``; ``layouts``: where each architecture
  keeps its per-head Q, K, V and O.

Names load their module on first use, so the light ones (``known``, ``steps``, ``layouts``) do
not import JAX or huggingface_hub.
"""

from spinjax._lazy import lazy_api

__getattr__, __dir__, __all__ = lazy_api(
    __name__,
    {
        "base": ("Checkpoint", "Source", "SourceKind", "Tensor"),
        "hf": ("HFCheckpoint",),
        "known": ("KNOWN", "KnownModel"),
        "layouts": ("VARIANTS", "Geometry", "Layout", "layout_for"),
        "registry": ("KINDS", "resolve"),
        "steps": ("select_steps",),
    },
)
