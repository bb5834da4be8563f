"""PASA flash attention (online pseudo-average shifting + global recovering) and its fp16 emulation.

Shape legend: B = batch, Hq / Hkv = query / KV heads (G = Hq // Hkv queries share a KV head),
Sq / Sk = query / key positions, Dqk = q-k head dim, Dv = value head dim, n = KV tile rows,
R = G * (query rows of one tile).

Modes (see docs/pasa.md):
  "fp64"        PASA in float64, no rounding: must equal attention_reference (the exactness check).
  "fp32"        plain FA2 online softmax in fp32 (the speed/accuracy yardstick).
  "fp16-naive"  plain FA2 online softmax; GEMMs on the emulated cube unit (fp16 in/out, fp32 accumulate)
                and every vector op rounded to fp16. Overflows once Q K^T passes 65504.
  "pasa"        PASA with fp16 GEMMs and every vector op rounded to fp16.
  "pasa-hybrid" PASA with fp16 GEMMs and fp32 vector statistics.
Masking replaces scores by a large finite negative (NEG_FP16 = -60000 in the fp16 modes, NEG_EXACT =
-1e30 in fp32/fp64) and the running max starts there, never at -inf. A query row with no key it may
attend (fully masked) returns zeros in every mode, never NaN.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from cloudmatrix.kernels.fp16 import cube_matmul, to_fp16
from cloudmatrix.kernels.pasa_beta import DEFAULT_BETA, shift_matrix, solve_beta

__all__ = ["DEFAULT_BETA", "MODES", "attention_reference", "flash_attention", "solve_beta"]

NEG_FP16 = -60000.0  # masked score / initial running max in fp16 modes: representable, below any real score
NEG_EXACT = -1e30  # the same in fp32/fp64, where shifted scores may legitimately pass -60000


@dataclasses.dataclass(frozen=True)
class _Arith:
    """How one mode computes: the dtype vector values live in, GEMMs on the emulated cube unit or
    not, the algorithm, the output rounding.

    In the fp16 modes the vector values are fp16 tensors: torch computes each fp16 op in fp32 and
    rounds its result to fp16, which is the vector unit's rule (compute in fp32, round every
    result), in one call per op instead of three."""

    dtype: torch.dtype
    cube: bool
    pasa: bool
    fp16_out: bool
    neg: float

    @property
    def wide(self) -> torch.dtype:
        """The dtype values are computed in before the vector unit holds them (the key shift's)."""
        return torch.float32 if self.dtype == torch.float16 else self.dtype

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float16:  # fp16 inputs: their fp32 GEMM is the cube's, up to its output rounding
            return torch.matmul(a.float(), b.float()).to(torch.float16)
        return cube_matmul(a, b) if self.cube else torch.matmul(a, b)


MODES: dict[str, _Arith] = {
    "fp64": _Arith(torch.float64, cube=False, pasa=True, fp16_out=False, neg=NEG_EXACT),
    "fp32": _Arith(torch.float32, cube=False, pasa=False, fp16_out=False, neg=NEG_EXACT),
    "fp16-naive": _Arith(torch.float16, cube=True, pasa=False, fp16_out=True, neg=NEG_FP16),
    "pasa": _Arith(torch.float16, cube=True, pasa=True, fp16_out=True, neg=NEG_FP16),
    "pasa-hybrid": _Arith(torch.float32, cube=True, pasa=True, fp16_out=True, neg=NEG_FP16),
}


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                        causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale Q K^T) V in float64, the slow obvious way. Fully masked rows give zeros."""
    (b, hq, sq, _), (_, hkv, sk, _) = q.shape, k.shape
    _check(q, k, v, causal, mask, 1, 1)
    g = hq // hkv
    k64, v64 = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ k64.transpose(-1, -2) * scale  # [B, Hq, Sq, Sk]
    allowed = _allowed(b, sq, sk, causal, mask)[:, None]  # [B, 1, Sq, Sk]
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)
    return probs @ v64


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mode: str,
                    causal: bool = False, mask: torch.Tensor | None = None, beta: float = DEFAULT_BETA,
                    tile_q: int = 128, tile_kv: int = 128) -> torch.Tensor:
    """Tiled attention. q: [B, Hq, Sq, Dqk], k: [B, Hkv, Sk, Dqk], v: [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv].

    causal: the queries are the last Sq of the Sk positions (query i sees key j iff j <= Sk - Sq + i).
    mask: bool [B, Sq, Sk], True = may attend. Returns float32 (float64 in mode "fp64").
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")
    _check(q, k, v, causal, mask, tile_q, tile_kv)
    ar = MODES[mode]
    (b, hq, sq, dqk), (_, hkv, sk, _), dv = q.shape, k.shape, v.shape[-1]
    q5 = q.to(ar.dtype).reshape(b, hkv, hq // hkv, sq, dqk)
    k, v, tile_mask = k.to(ar.wide), v.to(ar.dtype), mask
    if ar.pasa:  # whole tiles: every tile gets the same n x n shift matrix, padded keys are masked out
        k, v, tile_mask = _pad_keys(k, v, mask, sq, tile_kv)
        k = _shift_keys(k, _keys_in_use(tile_mask), beta, scale, tile_kv, ar)
    k = k.to(ar.dtype)
    tiles = _Tiles(sq, sk, k.shape[2], tile_kv, causal, tile_mask)
    coef = _const(beta / (1.0 - beta) if ar.pasa else scale, ar)  # gamma for PASA, the scale otherwise
    out = torch.zeros(b, hkv, hq // hkv, sq, dv, dtype=ar.dtype)
    for q0 in range(0, sq, tile_q):
        q1 = min(q0 + tile_q, sq)
        out[:, :, :, q0:q1] = _attend_q_tile(q5[:, :, :, q0:q1], k, v, q0, q1, tiles, coef, ar)
    valid = _allowed(b, sq, sk, causal, mask).any(-1)  # [B, Sq]
    out = torch.where(valid[:, None, None, :, None], out, 0.0).reshape(b, hq, sq, dv)
    if out.dtype == torch.float16:
        return out.float()  # fp16 values already
    return to_fp16(out) if ar.fp16_out else out


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """Which KV tiles a query tile visits, and the allowed-key mask of each visit."""

    sq: int
    sk: int  # real keys (causal positions refer to these)
    sk_tiled: int  # keys the loop walks over: sk, or sk padded to whole tiles
    tile_kv: int
    causal: bool
    mask: torch.Tensor | None  # bool [B or 1, Sq, sk_tiled]

    def visits(self, q0: int, q1: int):
        """Yields (k0, k1, allowed) with allowed bool [B or 1, tq, tk], or None when all keys are allowed."""
        end = min(self.sk, self.sk - self.sq + q1) if self.causal else self.sk
        for k0 in range(0, end, self.tile_kv):
            k1 = min(k0 + self.tile_kv, self.sk_tiled)
            allowed = self._allowed(q0, q1, k0, k1)
            if allowed is None or allowed.any():
                yield k0, k1, allowed

    def _allowed(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
        allowed = None
        if self.causal and k1 - 1 > self.sk - self.sq + q0:
            qi, kj = torch.arange(q0, q1)[:, None], torch.arange(k0, k1)[None, :]
            allowed = (kj <= self.sk - self.sq + qi)[None]
        if self.mask is not None:
            tile = self.mask[:, q0:q1, k0:k1]
            allowed = tile if allowed is None else allowed & tile
        return None if allowed is None or allowed.all() else allowed


@dataclasses.dataclass
class _State:
    """Running statistics of R query rows: m, l, avg: [B, Hkv, R, 1]; o: [B, Hkv, R, Dv]; j = tiles seen."""

    m: torch.Tensor
    l: torch.Tensor
    o: torch.Tensor
    avg: torch.Tensor | None = None
    j: int = 0


def _attend_q_tile(qt: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q0: int, q1: int, tiles: _Tiles,
                   coef: torch.Tensor, ar: _Arith) -> torch.Tensor:
    # qt: [B, Hkv, G, tq, Dqk] -> [B, Hkv, G, tq, Dv]
    b, hkv, g, tq, dqk = qt.shape
    rows = qt.reshape(b, hkv, g * tq, dqk)
    st = _State(m=torch.full((b, hkv, g * tq, 1), ar.neg, dtype=ar.dtype),
                l=torch.zeros(b, hkv, g * tq, 1, dtype=ar.dtype),
                o=torch.zeros(b, hkv, g * tq, v.shape[-1], dtype=ar.dtype))
    step = _pasa_step if ar.pasa else _online_softmax_step
    for k0, k1, allowed in tiles.visits(q0, q1):
        s = ar.matmul(rows, k[:, :, k0:k1].transpose(-1, -2))  # [B, Hkv, R, tk]
        st = step(st, s, v[:, :, k0:k1], allowed, g, coef, ar)
    return (st.o / st.l).reshape(b, hkv, g, tq, -1)


def _online_softmax_step(st: _State, s: torch.Tensor, vt: torch.Tensor, allowed: torch.Tensor | None,
                         g: int, scale: torch.Tensor, ar: _Arith) -> _State:
    """FA2: m = max(m, rowmax S); rescale l and O by exp(m_old - m). s = Q K^T: [B, Hkv, R, tk]."""
    s = _mask(s * scale, allowed, g, ar.neg)
    m = torch.maximum(st.m, s.amax(-1, keepdim=True))
    alpha = torch.exp(st.m - m)
    p = torch.exp(s - m)
    l = alpha * st.l + p.sum(-1, keepdim=True)
    o = alpha * st.o + ar.matmul(p, vt)
    return _State(m, l, o)


def _pasa_step(st: _State, s: torch.Tensor, vt: torch.Tensor, allowed: torch.Tensor | None,
               g: int, gamma: torch.Tensor, ar: _Arith) -> _State:
    """PASA: tile statistics re-referenced to the running global pseudo-average. s = Q (M K)^T."""
    j = st.j + 1
    a = s.mean(-1, keepdim=True)  # tile pseudo-average, before masking
    prev_avg = a if j == 1 else st.avg
    avg = a * _const(1.0 / j, ar) + prev_avg * _const((j - 1) / j, ar)
    d_cur, d_prev = gamma * (a - avg), gamma * (prev_avg - avg)
    s = _mask(s, allowed, g, ar.neg)
    m_tile = s.amax(-1, keepdim=True)
    p = torch.exp(s - m_tile)
    cur, prev = m_tile + d_cur, st.m + d_prev
    m = torch.maximum(cur, prev).clamp_min(ar.neg)
    e_prev, e_cur = torch.exp(prev - m), torch.exp(cur - m)
    l = e_prev * st.l + e_cur * p.sum(-1, keepdim=True)
    o = e_prev * st.o + e_cur * ar.matmul(p, vt)
    return _State(m, l, o, avg, j)


def _pad_keys(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sq: int, n: int):
    """Pad k, v: [B, Hkv, Sk, D] with zero rows to whole tiles of n; the mask ([B or 1, Sq, Sk_pad]) hides them."""
    sk = k.shape[2]
    pad = -sk % n
    if pad == 0:
        return k, v, mask
    if mask is None:
        mask = torch.ones(1, sq, sk, dtype=torch.bool)
    grow = (0, 0, 0, pad)
    return F.pad(k, grow), F.pad(v, grow), F.pad(mask, (0, pad), value=False)


def _keys_in_use(mask: torch.Tensor | None) -> torch.Tensor | None:
    """bool [B or 1, Sk]: keys some query may attend (causality aside); None when all are."""
    if mask is None:
        return None
    used = mask.any(1)
    return None if used.all() else used


def _shift_keys(k: torch.Tensor, used: torch.Tensor | None, beta: float, scale: float, n: int,
                ar: _Arith) -> torch.Tensor:
    """K~ = M K per tile of n rows, M = scale (I - beta/n 1 1^T). k: [B, Hkv, T * n, D] -> same shape.

    The shift uses the same n x n M for every tile (as the hardware does). Key rows no query may attend
    (tile padding, padded sequence ends) are first replaced by the mean of the tile's used rows, so the
    shift tracks the real keys; the pseudo-average a_j is taken over the same n columns, so recovery stays
    exact whatever those rows held.
    """
    b, h, sk, d = k.shape
    k5 = k.reshape(b, h, sk // n, n, d)
    if used is not None:
        w = used.reshape(used.shape[0], 1, sk // n, n, 1)  # [B or 1, 1, T, n, 1]
        weights = w.to(k5.dtype)
        used_sum = torch.matmul(weights.transpose(-1, -2), k5)  # [B, Hkv, T, 1, D]: no full-size temporary
        k5 = torch.where(w, k5, used_sum / weights.sum(-2, keepdim=True).clamp_min(1.0))  # the shift rounds it
    return apply_shift(shift_matrix(n, beta, scale, k5.dtype), k5, ar).reshape(b, h, sk, d)


def apply_shift(m: torch.Tensor, k5: torch.Tensor, ar: _Arith) -> torch.Tensor:
    """``ar.matmul(m, k5)`` for the shift matrix M = a I + c 1 1^T, in O(n D) per tile instead of
    O(n^2 D): M K = m_ii K + m_ij (colsum(K) - K). m: [n, n], k5: [..., n, D] -> [..., n, D].

    Inputs are rounded as the cube unit rounds them (fp16) and the products accumulate in fp32, as
    in the GEMM; only the order of the fp32 additions differs (the hardware's is not specified
    either), so an output may differ from the GEMM form's in its last fp16 bit. In place where it
    can be: the key tensors are the largest of a decode step's attention."""
    cube = ar.cube
    diag, off = (to_fp16(m[0, 0]), to_fp16(m[0, 1])) if cube else (m[0, 0], m[0, 1])
    k_in = k5.to(torch.float16).to(k5.dtype) if cube else k5
    out = (k_in.sum(-2, keepdim=True) - k_in).mul_(off.item()).add_(k_in, alpha=diag.item())
    return out.copy_(out.to(torch.float16)) if cube else out


def _mask(s: torch.Tensor, allowed: torch.Tensor | None, g: int, neg: float) -> torch.Tensor:
    # s: [B, Hkv, G * tq, tk], allowed: [B or 1, tq, tk]
    if allowed is None:
        return s
    b, hkv, rows, tk = s.shape
    s5 = s.reshape(b, hkv, g, rows // g, tk)
    return torch.where(allowed[:, None, None], s5, neg).reshape(b, hkv, rows, tk)


def _const(x: float, ar: _Arith) -> torch.Tensor:
    return torch.tensor(x, dtype=ar.wide).to(ar.dtype)


def _allowed(b: int, sq: int, sk: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """bool [B, Sq, Sk]: may query i attend key j."""
    allowed = torch.ones(b, sq, sk, dtype=torch.bool)
    if causal:
        allowed &= torch.arange(sk)[None, :] <= sk - sq + torch.arange(sq)[:, None]
    if mask is not None:
        allowed &= mask
    return allowed


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None,
           tile_q: int, tile_kv: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (b, hq, sq, dqk), (bk, hkv, sk, dk) = q.shape, k.shape
    if (bk, dk) != (b, dqk) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if causal and sk < sq:
        raise ValueError(f"causal attention needs Sk >= Sq (queries are the last Sq keys); got Sq={sq}, Sk={sk}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, sq, sk)):
        raise ValueError(f"mask must be bool [B, Sq, Sk] = {(b, sq, sk)}; got {mask.dtype} {tuple(mask.shape)}")
    if tile_q < 1 or tile_kv < 1:
        raise ValueError(f"tile sizes must be positive; got tile_q={tile_q}, tile_kv={tile_kv}")
