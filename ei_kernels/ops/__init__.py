"""One file per backend of the fused MoR op: each exposes `forward` and `backward` with the
signatures of `torch_mor` (the reference contract the other backends follow)."""
