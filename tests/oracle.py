"""Independent references in numpy float64, written from the models' published description (the architecture,
the masked-diffusion objective and its decoding) and the official ML-GSAI/LLaDA code.

`forward` is the model; `official_generate` re-derives the official fixed-canvas decoding loop.
Nothing here imports illada_mlx.
"""

from __future__ import annotations

import numpy as np

NEG = -1e300  # finite "−inf" for masked keys, so an all-padded query row stays finite


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, theta, offset=0):
    """Half-split ("rotate_half") RoPE over the sequence axis -2, positions offset..offset+L-1."""
    L, D = x.shape[-2], x.shape[-1]
    inv = theta ** (-np.arange(0, D, 2) / D)
    ang = np.arange(offset, offset + L)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def forward(p, ids, heads, kv_heads, theta=10000.0, eps=1e-5, key_valid=None, store=None, offset=0, length=None):
    """Logits (B, L, V) in float64. key_valid (B, L): 1 for real tokens, 0 for padding.

    With `store` (a dict, empty at first): `ids` is the window [offset, offset + L) of a canvas of
    `length` positions; every layer's keys/values of the window are written into store[layer] (kept,
    (B, kv_heads, length, hd)) and attention runs over all `length` stored positions."""
    ids = np.asarray(ids)
    B, L = ids.shape
    h = p["embed"][ids]
    d = h.shape[-1]
    hd = d // heads
    for i, lay in enumerate(p["layers"]):
        n = rmsnorm(h, lay["attn_norm"], eps)

        def proj(w, b, nh):
            y = n @ lay[w].T + (lay[b] if b in lay else 0)
            return y.reshape(B, L, nh, hd).transpose(0, 2, 1, 3)

        q, k, v = proj("wq", "bq", heads), proj("wk", "bk", kv_heads), proj("wv", "bv", kv_heads)
        q, k = rope(q, theta, offset), rope(k, theta, offset)
        if store is not None:
            K, V = store.get(i, (np.zeros((B, kv_heads, length, hd)), np.zeros((B, kv_heads, length, hd))))
            if K.shape[2] < length:
                pad = ((0, 0), (0, 0), (0, length - K.shape[2]), (0, 0))
                K, V = np.pad(K, pad), np.pad(V, pad)
            K, V = K.copy(), V.copy()
            K[:, :, offset : offset + L], V[:, :, offset : offset + L] = k, v
            store[i] = (K, V)
            k, v = K[:, :, :length], V[:, :, :length]
        rep = heads // kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # no causal mask: bidirectional
        if key_valid is not None:
            s = np.where(np.asarray(key_valid)[:, None, None, :] > 0, s, NEG)
        o = (softmax(s) @ v).transpose(0, 2, 1, 3).reshape(B, L, d)
        h = h + o @ lay["wo"].T + lay.get("bo", 0)
        n = rmsnorm(h, lay["ffn_norm"], eps)
        g = n @ lay["w_gate"].T
        h = h + ((g / (1 + np.exp(-g))) * (n @ lay["w_up"].T)) @ lay["w_down"].T
    return rmsnorm(h, p["norm"], eps) @ p["head"].T


def transfer_counts(n_masked: int, steps: int) -> list[int]:
    """k_t = floor(n/s) + (1 if t < n mod s)."""
    return [n_masked // steps + (1 if t < n_masked % steps else 0) for t in range(steps)]


def official_generate(
    logits_fn,
    prompt,
    steps,
    gen_length,
    block_length,
    mask_id,
    temperature=0.0,
    cfg_scale=0.0,
    remasking="low_confidence",
    uniforms=None,
    key_valid=None,
):
    """The official fixed-canvas algorithm (spec §4), float64, batch of equal-length (left-padded) rows.

    logits_fn(x, key_valid) -> (B, L, V) float64. `uniforms(step, kind, shape)` supplies the random
    numbers for random remasking / Gumbel noise, so the test can feed the same ones as the sampler.
    """
    prompt = np.asarray(prompt)
    B, P = prompt.shape
    x = np.concatenate([prompt, np.full((B, gen_length), mask_id)], axis=1)
    kv = None if key_valid is None else np.concatenate([np.asarray(key_valid), np.ones((B, gen_length))], axis=1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    nb = gen_length // block_length
    assert steps % nb == 0
    s = steps // nb
    step = 0
    for b in range(nb):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        counts = [transfer_counts(int((x[j, lo:hi] == mask_id).sum()), s) for j in range(B)]
        for i in range(s):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un = x.copy()
                un[prompt_index] = mask_id
                both = logits_fn(np.concatenate([x, un]), None if kv is None else np.concatenate([kv, kv]))
                cond, unc = both[:B], both[B:]
                logits = unc + (cfg_scale + 1) * (cond - unc)
            else:
                logits = logits_fn(x, kv)
            if temperature > 0:
                u = uniforms(step, "gumbel", logits.shape)
                noisy = np.exp(logits) / (-np.log(u)) ** temperature
            else:
                noisy = logits
            x0 = noisy.argmax(-1)
            if remasking == "low_confidence":
                p = softmax(logits)
                conf = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            else:
                conf = uniforms(step, "remask", x0.shape).astype(np.float64)
            conf[:, hi:] = -np.inf
            x0 = np.where(mask_index, x0, x)
            conf = np.where(mask_index, conf, -np.inf)
            for j in range(B):
                k = counts[j][i]
                sel = np.argsort(-conf[j], kind="stable")[:k]
                x[j, sel] = x0[j, sel]
            step += 1
    return x


def _guided(logits_fn, x, P, mask_id, cfg_scale):
    """Logits (L, V) of one canvas; with CFG, un + (cfg + 1)(cond − un), the prompt masked in `un`."""
    logits = logits_fn(x[None], None)[0]
    if cfg_scale > 0:
        un = x.copy()
        un[:P] = mask_id
        u = logits_fn(un[None], None)[0]
        logits = u + (cfg_scale + 1) * (logits - u)
    return logits


def official_log_likelihood(logits_fn, prompt, answer, masks, mask_id, cfg_scale=0.0):
    """get_log_likelihood with the given mask rows (mc_num, L): Σ over rows of the cross-entropy on the
    masked answer positions / (masked / L), averaged over rows and negated; CFG masks the prompt."""
    P, L = len(prompt), len(answer)
    seq = np.array(list(prompt) + list(answer))
    total = 0.0
    for m in np.asarray(masks, bool):
        x = seq.copy()
        x[P:][m] = mask_id
        logits = _guided(logits_fn, x, P, mask_id, cfg_scale)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        idx = np.nonzero(m)[0]
        total += -logp[P + idx, seq[P + idx]].sum() / (len(idx) / L)
    return -total / len(masks)


def official_greedy(logits_fn, prefix, length, mask_id, cfg_scale=0.0):
    """suffix_greedy_prediction's decoding: `length` masks after the prefix, one revealed per forward (the
    most confident masked position takes its argmax)."""
    P = len(prefix)
    x = np.array(list(prefix) + [mask_id] * length)
    for _ in range(length):
        logits = _guided(logits_fn, x, P, mask_id, cfg_scale)
        masked = np.nonzero(x == mask_id)[0]
        p = softmax(logits[masked])
        x0 = p.argmax(-1)
        best = int(np.argmax(p[np.arange(len(masked)), x0]))
        x[masked[best]] = x0[best]
    return x[P:].tolist()
