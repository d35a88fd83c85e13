"""An FP8 training recipe: how a Linear layer's matmuls are scaled into FP8, as one value with a string form.

FP8 training (the paper's recipe one format further, as torchao.float8 and Transformer Engine do it)
runs the three matmuls of a Linear layer on FP8 operands, each scaled so that its largest magnitude
lands near the format's max: the forward's input and weight in E4M3, the backward's output gradient in
E5M2 (the "hybrid" recipe; ``e4m3`` selects E4M3 for it too). Products are accumulated in FP32 and the
result is given back in the layer's 16-bit compute dtype. Everything else stays as the policy says.

How the scales are found, `Fp8Recipe.granularity`:

* ``tensorwise``: one scale per tensor, from its amax now (torchao's default "tensorwise" recipe);
* ``delayed``: one scale per tensor, from the amax history of the last `history` steps (``algo`` "max"
  of it or the "recent" one; ``margin`` powers of two of headroom), Transformer Engine's delayed scaling;
* ``rowwise``: one scale per row along the contraction dimension (torchao's "rowwise");
* ``blockwise``: 1 x `block` tiles of activations and gradients, `block` x `block` tiles of weights, along
  the contraction dimension (DeepSeek-V3's fine-grained FP8, `block` 128);
* ``mx``: 1 x `block` blocks (32) with power-of-two (E8M0) scales, the OCP Microscaling formats.

A scale is ``format max / amax`` in FP64, rounded to FP32 (torchao's rule); ``pow2`` rounds it down to a
power of two (exact rescaling). MX scales are powers of two by definition.

Example:
    >>> r = Fp8Recipe.parse("delayed:history=4:e4m3")
    >>> r.granularity, r.history, r.grad_format, str(r)
    ('delayed', 4, 'e4m3', 'delayed:history=4:e4m3')
    >>> str(Fp8Recipe.parse("rowwise:pow2")), Fp8Recipe.parse("mx").block
    ('rowwise:pow2', 32)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Fp8Recipe", "GRANULARITIES"]

#: Scaling granularity -> what it means (one line each).
GRANULARITIES: dict[str, str] = {
    "tensorwise": "one scale per tensor from its amax now (torchao tensorwise)",
    "delayed": "one scale per tensor from the amax history of past steps (Transformer Engine delayed scaling)",
    "rowwise": "one scale per row along the contraction dimension (torchao rowwise)",
    "blockwise": "1x128 tiles of activations and gradients, 128x128 of weights (DeepSeek-V3)",
    "mx": "32-element blocks with power-of-two E8M0 scales (OCP Microscaling)",
}
_DEFAULT_BLOCK = {"blockwise": 128, "mx": 32}
_ALGOS = ("max", "recent")


@dataclass(frozen=True)
class Fp8Recipe:
    """How FP8 Linear layers scale their operands (frozen; `Fp8Recipe.parse` reads the policy spelling).

    Args:
        granularity: one of `GRANULARITIES`.
        grad_format: ``"e5m2"`` (hybrid: forward E4M3, gradients E5M2) or ``"e4m3"`` (all E4M3).
        pow2: round every scale down to a power of two (always so for ``mx``).
        history: delayed scaling: how many past amaxes are kept (1..1024).
        margin: delayed scaling: the scale is divided by ``2**margin`` (headroom for growth), 0..8.
        algo: delayed scaling: ``"max"`` (of the history) or ``"recent"`` (the last amax).
        block: tile length for ``blockwise`` (default 128) and ``mx`` (default 32); 0 for the others.
    """

    granularity: str = "tensorwise"
    grad_format: str = "e5m2"
    pow2: bool = False
    history: int = 16
    margin: int = 0
    algo: str = "max"
    block: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown FP8 scaling {self.granularity!r}; valid: "
                             + "; ".join(f"{g} ({d})" for g, d in GRANULARITIES.items()))
        if self.grad_format not in ("e5m2", "e4m3"):
            raise ValueError(f"FP8 gradients are e5m2 (hybrid) or e4m3, got {self.grad_format!r}")
        if not isinstance(self.history, int) or not 1 <= self.history <= 1024:
            raise ValueError(f"an FP8 amax history holds 1..1024 steps, got history={self.history!r}")
        if not isinstance(self.margin, int) or not 0 <= self.margin <= 8:
            raise ValueError(f"an FP8 scale margin is 0..8 powers of two, got margin={self.margin!r}")
        if self.algo not in _ALGOS:
            raise ValueError(f"an FP8 amax history is read by 'max' or 'recent', got algo={self.algo!r}")
        default = _DEFAULT_BLOCK.get(self.granularity, 0)
        block = default if self.block == 0 else self.block
        if default == 0 and block:
            raise ValueError(f"block= applies to blockwise and mx scaling only, not {self.granularity}")
        if default and (not isinstance(block, int) or block < 1 or block & (block - 1)):
            raise ValueError(f"an FP8 block length is a power of two, got block={self.block!r}")
        object.__setattr__(self, "block", block)
        if self.granularity == "mx":
            object.__setattr__(self, "pow2", True)

    @property
    def forward_format(self) -> str:
        """The FP8 format of the forward's operands (input and weight): always ``"e4m3"``."""
        return "e4m3"

    @property
    def delayed(self) -> bool:
        """Whether scales come from an amax history (state kept across steps) rather than the tensor now."""
        return self.granularity == "delayed"

    @classmethod
    def parse(cls, text: str | Fp8Recipe) -> Fp8Recipe:
        """``GRANULARITY[:OPTION...]``, options ``e4m3`` / ``e5m2``, ``pow2``, ``history=N``, ``margin=M``,
        ``algo=max|recent``, ``block=N``; e.g. ``"tensorwise"``, ``"delayed:history=16:margin=1"``."""
        if isinstance(text, Fp8Recipe):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"an FP8 recipe is a granularity ({', '.join(GRANULARITIES)}) with ':'-separated "
                             f"options, e.g. 'rowwise:pow2', got {text!r}")
        granularity, *options = [o.strip().lower() for o in text.split(":")]
        fields: dict[str, object] = {"granularity": granularity}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep and key in ("e4m3", "e5m2"):
                fields["grad_format"] = key
            elif not sep and key == "pow2":
                fields["pow2"] = True
            elif sep and key in ("history", "margin", "block") and value.isdigit():
                fields[key] = int(value)
            elif sep and key == "algo":
                fields["algo"] = value
            else:
                raise ValueError(f"unknown FP8 recipe option {option!r} in {text!r}; valid: e4m3, e5m2, pow2, "
                                 f"history=N, margin=M, algo=max|recent, block=N")
        if granularity != "delayed" and {"history", "margin", "algo"} & set(fields):
            raise ValueError(f"history, margin and algo apply to delayed scaling only, not {granularity!r}")
        return cls(**fields)  # type: ignore[arg-type]

    def __str__(self) -> str:
        parts = [self.granularity]
        if self.delayed:
            parts += [f"history={self.history}"] * (self.history != 16) + [f"margin={self.margin}"] * bool(
                self.margin) + [f"algo={self.algo}"] * (self.algo != "max")
        if self.block and self.block != _DEFAULT_BLOCK[self.granularity]:
            parts.append(f"block={self.block}")
        if self.pow2 and self.granularity != "mx":
            parts.append("pow2")
        if self.grad_format != "e5m2":
            parts.append(self.grad_format)
        return ":".join(parts)
