"""GPU kernels (Metal / CUDA) for the candidates pass; filled in below, None when not applicable."""


def fused_candidates(logits, temperature, want_entropy):
    return None
