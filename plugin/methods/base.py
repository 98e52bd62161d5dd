"""The shared base of every method: one file per method subclasses ``Method`` and is ``@register``-ed."""

from __future__ import annotations

from typing import ClassVar

from ..config import MethodConfig


class Method:
    """A training-free method. Subclasses set the class attributes and implement ``attach``.

    Lifecycle inside ``nograd.apply``: ``Config.from_options`` and ``check_model`` validate (raise before any
    change), then ``attach(handle)`` makes the changes, each recorded on the handle.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    """Adapter kinds the method works on: "text", "vlm", "dit"."""
    families: ClassVar[tuple[str, ...]] = ()
    """The families it supports, checked by ``nograd.apply`` before anything else (left empty: every family of
    ``kinds``)."""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    resources: ClassVar[tuple[str, ...]] = ()
    """What the method needs for itself on a model. Two methods claiming the same resource cannot share a model;
    every method claims its own name (it cannot be attached twice)."""
    own_generate: ClassVar[bool] = False
    """True if the method answers through its handle's own ``generate(...)`` (CARVE's passes) rather than through
    ``model.generate``."""
    reads: ClassVar[tuple[str, ...]] = ()
    """What the method relies on without holding it: it shares a model with other readers, but not with a method
    that claims the same name in ``resources`` (``"token_layout"``: methods that find keys by position read it,
    token dropping changes it)."""

    def __init__(self, adapter, config: MethodConfig):
        self.adapter = adapter
        self.config = config

    @classmethod
    def claims(cls) -> set[str]:
        return {cls.name, *cls.resources}

    @classmethod
    def conflicts(cls, other: type["Method"]) -> set[str]:
        """What keeps ``cls`` and ``other`` off one model: a resource both claim, or one that one claims and the
        other reads (empty: they share it)."""
        return (cls.claims() & other.claims()) | (cls.claims() & set(other.reads)) | (set(cls.reads) & other.claims())

    def supports_assisted_decoding(self) -> bool:
        """Whether ``generate()``'s assisted / prompt-lookup decoding gives this method's results. Its first forward
        runs the prompt and a draft together: a method that reads the prompt's last token there says False, and
        ``nograd.apply`` makes such a ``generate()`` raise ``NotImplementedError``."""
        return True

    def keeps_prompt_state(self) -> bool:
        """Whether the method keeps what it found in a prompt's forward for the later forwards of a generation (sinks,
        keep sets, the image's positions). A forward of the model between them that is not the generation's (what
        transformers' ``guidance_scale`` runs) would replace it, and a prompt split over several forwards
        (``prefill_chunk_size``) would be read from its first chunk, so ``nograd.apply`` makes such a ``generate()``
        raise ``NotImplementedError``."""
        return False

    def check_model(self) -> None:
        """Validate options against this model (layer and head indices...); raise ``ValueError`` naming the option."""

    def attach(self, handle) -> None:
        raise NotImplementedError
