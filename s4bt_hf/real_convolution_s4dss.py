"""The DSS convolution in real arithmetic, for any sequence length in one traced graph: what
`torch.export` and ONNX need (ONNX has no complex dtypes, and the FFT that the eager forward uses
is complex in torch). Every complex number here is a (re, im) pair of reals.

Each DSS layer's causal convolution y = K * u, K_k = Re Σ_n W_n ā_n^k (W = C·B̄, ā = exp(Δλ)),
is computed exactly by a chunked recurrence with a fixed chunk T, so that the graph only holds
matmuls, exp, cos and sin whatever the length:

    inside a chunk:   a (T, T) lower-triangular Toeplitz matrix of K_0..K_{T-1};
    between chunks:   the state s_n at each chunk end, S_c = ā^T S_{c-1} + Σ_j ā^{T-1-j} u_{c,j},
                      a linear recurrence over the L/T chunks (`diagonal_scan`), read out as
                      Re Σ_n W_n ā_n^{t+1} S_{c-1,n} at position t of chunk c.

The powers ā^k = exp(k Re Δλ) (cos(k Im Δλ) + i sin(k Im Δλ)) are computed from the real and
imaginary parts of Δλ. A bidirectional layer's backward kernel is the same causal convolution run
on the reversed sequence, shifted by one position (it sees only later positions).

Used by the model's own forward while `torch.export` traces it (transformers' exporters) and by
`s4bt_hf.export`'s whole-sequence module. This file is copied into saved checkpoints (remote
code): it imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn

# scan of the chunk-end states: blocks of SCAN_BLOCK chunks, SCAN_LEVELS levels, then one dense
# lower-triangular matrix over what remains (about L / (T · SCAN_BLOCK^SCAN_LEVELS) + 2 steps: 2 at
# L = 16384 with T = 32, 34 at L = 2^20), so the cost stays O(L) for any length a graph gets.
# Small blocks waste the least padding on short sequences: 4 x 5 levels ran 1.3-1.7x faster than
# 16 x 2 on a 128-channel, N = 64 layer at L = 784 and 4096 (2 CPU threads), 1.2x at 16384.
SCAN_BLOCK = 4
SCAN_LEVELS = 5
MIN_CHUNK = 32


def real_convolution_chunk(num_modes: int) -> int:
    """The chunk T: the power of two >= max(MIN_CHUNK, 2N), so that the Toeplitz block costs about
    what the state matmuls cost (the rule of `kernel_s4dss.convolution_chunk`, without a length)."""
    return max(MIN_CHUNK, 1 << max(0, 2 * num_modes - 1).bit_length())


def real_powers(log_re: torch.Tensor, log_im: torch.Tensor, exponents: torch.Tensor):
    """ā^k = exp(k Re log ā) (cos(k Im log ā), sin(k Im log ā)) for every k in `exponents` (K,).

    Args: log_re, log_im (...) real. Returns (re, im), each (..., K).
    """
    angle = log_im.unsqueeze(-1) * exponents
    scale = torch.exp(log_re.unsqueeze(-1) * exponents)
    return scale * torch.cos(angle), scale * torch.sin(angle)


def _lower_triangular_powers(log_re, log_im, size, device, dtype):
    """M[..., i, j] = ā^{i-j} for i >= j, 0 above the diagonal: (re, im), each (..., size, size)."""
    index = torch.arange(size, device=device)
    lag = index.unsqueeze(1) - index.unsqueeze(0)  # [i, j] = i - j
    power_re, power_im = real_powers(log_re, log_im, lag.clamp(min=0).to(dtype).reshape(-1))
    shape = (*log_re.shape, size, size)
    causal = lag >= 0
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(causal, power_re.reshape(shape), zero), torch.where(causal, power_im.reshape(shape), zero)


def _pad_to_multiple(values: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad the last axis to a multiple of `block` with at least one extra block (a causal
    recurrence: a zero tail changes no earlier output). Returns (padded, number of blocks).

    The extra block keeps the block count >= 2 for every length, so `torch.export` never meets a
    size-1 axis (where broadcasting would take another path) and traces one graph for all lengths;
    ceil-division rather than `-n % block` keeps its symbolic shapes simple."""
    num_blocks = (values.shape[-1] + block - 1) // block + 1
    return nn.functional.pad(values, (0, num_blocks * block - values.shape[-1])), num_blocks


def diagonal_scan(x_re, x_im, log_re, log_im, levels: int = SCAN_LEVELS, block: int = SCAN_BLOCK):
    """s_m = ā s_{m-1} + x_m (s_{-1} = 0) along the last axis, for a complex ā per group.

    Blocks of `block` steps: inside each block one matmul by the lower-triangular matrix of
    ā^{i-j}; the block-end states follow the same recurrence with ā^block (a recursive call,
    `levels` deep, then one dense matrix over all remaining steps), and reach position t of the
    next block as ā^{t+1} times the entering state.

    Args: x_re, x_im (G, B, M) real; log_re, log_im (G,) real, the parts of log ā (Re < 0).
    Returns: (s_re, s_im), each (G, B, M).
    """
    groups, batch, length = x_re.shape
    dtype, device = x_re.dtype, x_re.device
    if levels == 0:
        matrix_re, matrix_im = _lower_triangular_powers(log_re, log_im, length, device, dtype)
        # s_i = Σ_j M[i, j] x_j:  (G, B, M) @ (G, M, M)^T
        matrix_re, matrix_im = matrix_re.transpose(1, 2), matrix_im.transpose(1, 2)
        return x_re @ matrix_re - x_im @ matrix_im, x_re @ matrix_im + x_im @ matrix_re
    (x_re, num_blocks), (x_im, _) = _pad_to_multiple(x_re, block), _pad_to_multiple(x_im, block)
    x_re, x_im = x_re.reshape(groups, batch * num_blocks, block), x_im.reshape(groups, batch * num_blocks, block)
    matrix_re, matrix_im = _lower_triangular_powers(log_re, log_im, block, device, dtype)
    matrix_re, matrix_im = matrix_re.transpose(1, 2), matrix_im.transpose(1, 2)
    local_re = x_re @ matrix_re - x_im @ matrix_im
    local_im = x_re @ matrix_im + x_im @ matrix_re
    # S_c = ā^T S_{c-1} + local_c[T-1] over the chunks; the state entering chunk c is S_{c-1}
    ends_re = local_re[..., -1].reshape(groups, batch, num_blocks)
    ends_im = local_im[..., -1].reshape(groups, batch, num_blocks)
    end_re, end_im = diagonal_scan(ends_re, ends_im, log_re * block, log_im * block, levels - 1, block)
    enter_re = nn.functional.pad(end_re, (1, 0))[..., :num_blocks].reshape(groups, batch * num_blocks, 1)
    enter_im = nn.functional.pad(end_im, (1, 0))[..., :num_blocks].reshape(groups, batch * num_blocks, 1)
    offsets = torch.arange(1, block + 1, device=device, dtype=dtype)
    carry_re, carry_im = real_powers(log_re, log_im, offsets)  # ā^{t+1}, (G, T)
    carry_re, carry_im = carry_re.unsqueeze(1), carry_im.unsqueeze(1)
    s_re = local_re + carry_re * enter_re - carry_im * enter_im
    s_im = local_im + carry_re * enter_im + carry_im * enter_re
    padded = num_blocks * block
    return s_re.reshape(groups, batch, padded)[..., :length], s_im.reshape(groups, batch, padded)[..., :length]


def real_causal_convolution(inputs, log_re, log_im, weight_re, weight_im, chunk: int):
    """y_t = Σ_{j<=t} K_{t-j} u_j with K_k = Re Σ_n W_n ā_n^k, in real arithmetic (see the module
    docstring): O(B·H·L·(T + 4N)) multiply-adds for chunk T, any length.

    Args: inputs u (B, L, H); log_re, log_im (H, N) the parts of log ā = Δλ; weight_re, weight_im
    (H, N) the parts of W = C·B̄; chunk T. Returns: (B, L, H).
    """
    batch, length, channels = inputs.shape
    num_modes = log_re.shape[-1]
    dtype, device = inputs.dtype, inputs.device
    blocks, num_chunks = _pad_to_multiple(inputs.permute(2, 0, 1), chunk)  # (H, B, C*T)
    blocks = blocks.reshape(channels, batch * num_chunks, chunk)  # rows ordered (batch, chunk)
    offsets = torch.arange(chunk, device=device, dtype=dtype)
    power_re, power_im = real_powers(log_re, log_im, offsets)  # ā^t, (H, N, T)

    kernel = (weight_re.unsqueeze(-1) * power_re - weight_im.unsqueeze(-1) * power_im).sum(1)  # K_0..K_{T-1}
    lags = torch.arange(chunk, device=device)
    lag = lags.unsqueeze(0) - lags.unsqueeze(1)  # [j, t] = t - j
    toeplitz = torch.where(lag >= 0, kernel[:, lag.clamp(min=0)], torch.zeros((), dtype=dtype, device=device))
    outputs = blocks @ toeplitz  # in-chunk part, (H, B*C, T)

    # chunk-end states Σ_j ā^{T-1-j} u_j, then the recurrence over chunks, per (channel, mode)
    local_re = (blocks @ power_re.flip(-1).transpose(1, 2)).reshape(channels, batch, num_chunks, num_modes)
    local_im = (blocks @ power_im.flip(-1).transpose(1, 2)).reshape(channels, batch, num_chunks, num_modes)
    local_re = local_re.permute(0, 3, 1, 2).reshape(channels * num_modes, batch, num_chunks)  # (H*N, B, C)
    local_im = local_im.permute(0, 3, 1, 2).reshape(channels * num_modes, batch, num_chunks)
    end_re, end_im = diagonal_scan(local_re, local_im, (log_re * chunk).reshape(-1), (log_im * chunk).reshape(-1))
    # the state entering chunk c is the state at the end of chunk c-1
    rows = batch * num_chunks
    enter_re = nn.functional.pad(end_re, (1, 0))[..., :num_chunks].reshape(channels, num_modes, rows).transpose(1, 2)
    enter_im = nn.functional.pad(end_im, (1, 0))[..., :num_chunks].reshape(channels, num_modes, rows).transpose(1, 2)
    # readout Re Σ_n W_n ā_n^{t+1} S_n:  R = W ā^{t+1}
    step_re, step_im = real_powers(log_re, log_im, offsets + 1)
    readout_re = weight_re.unsqueeze(-1) * step_re - weight_im.unsqueeze(-1) * step_im  # (H, N, T)
    readout_im = weight_re.unsqueeze(-1) * step_im + weight_im.unsqueeze(-1) * step_re
    outputs = outputs + enter_re @ readout_re - enter_im @ readout_im  # (H, B*C, T)
    return outputs.reshape(channels, batch, num_chunks * chunk)[..., :length].permute(1, 2, 0)


def real_discrete_system(log_dt, log_A_real, A_imag, B, C, dtype: torch.dtype):
    """The zero-order-hold system of `kernel_s4dss.zoh_discretize` from a kernel's real parameters,
    without a complex tensor: log ā = Δλ and W = C·B̄ as (re, im) pairs in `dtype`.

    B̄ = expm1(Δλ)/λ · b needs expm1 of a tiny Δλ (Δ down to 1e-4): ONNX lowers expm1 to Exp - 1,
    which in float32 loses up to 2e-3 of it, so these few (H, N) values are computed in float64.

    Args: log_dt (H,), log_A_real and A_imag (H, N), B (H, N, 2), C (c, H, N, 2).
    Returns: log_re, log_im (H, N) and weight_re, weight_im (c, H, N), the arguments of `real_convolution`.
    """
    wide = torch.float64
    step = torch.exp(log_dt.to(wide)).unsqueeze(-1)
    mode_re, mode_im = -torch.exp(log_A_real.to(wide)), A_imag.to(wide)
    log_re, log_im = step * mode_re, step * mode_im
    # expm1(x + iy) = (expm1(x) cos y - 2 sin²(y/2)) + i e^x sin y: no cancellation for small x, y
    half_sin = torch.sin(log_im / 2)
    grow_re = torch.expm1(log_re) * torch.cos(log_im) - 2 * half_sin * half_sin
    grow_im = torch.exp(log_re) * torch.sin(log_im)
    # / λ, then · b
    norm = mode_re * mode_re + mode_im * mode_im
    ratio_re = (grow_re * mode_re + grow_im * mode_im) / norm
    ratio_im = (grow_im * mode_re - grow_re * mode_im) / norm
    input_re, input_im = B[..., 0].to(wide), B[..., 1].to(wide)
    bar_re = ratio_re * input_re - ratio_im * input_im
    bar_im = ratio_re * input_im + ratio_im * input_re
    output_re, output_im = C[..., 0].to(wide), C[..., 1].to(wide)
    weight_re = output_re * bar_re - output_im * bar_im
    weight_im = output_re * bar_im + output_im * bar_re
    return log_re.to(dtype), log_im.to(dtype), weight_re.to(dtype), weight_im.to(dtype)


def real_convolution(inputs, log_re, log_im, weight_re, weight_im, chunk: int):
    """y_t = Σ_{s<=t} K0_{t-s} u_s (+ Σ_{s>t} K1_{s-t-1} u_s with a second row of weights: a
    bidirectional layer), the two-sided convolution of `kernel_s4dss.fft_convolution`, in real
    arithmetic.

    Args: inputs u (B, L, H); log_re, log_im (H, N); weight_re, weight_im (c, H, N), c = 1 or 2.
    Returns: (B, L, H).
    """
    outputs = real_causal_convolution(inputs, log_re, log_im, weight_re[0], weight_im[0], chunk)
    if weight_re.shape[0] == 2:
        # the causal convolution of the reversed sequence, one position later
        backward = real_causal_convolution(inputs.flip(1), log_re, log_im, weight_re[1], weight_im[1], chunk)
        outputs = outputs + nn.functional.pad(backward, (0, 0, 1, 0))[:, :-1].flip(1)
    return outputs
