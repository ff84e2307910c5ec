"""The math of a DSS layer: zero-order-hold discretisation, convolution kernel, FFT convolution
and the equivalent recurrence. Pure functions on tensors, shared by the convolutional forward,
the streaming step and balanced truncation.

Notation: H channels, N complex modes per channel, L sequence length, c output rows per channel
(1, or 2 for a bidirectional layer: forward and backward kernels sharing the modes).

Every channel h is the continuous-time system  x'(t) = diag(λ_h) x(t) + b_h u(t),
y(t) = Re(c_h · x(t)); with step Δ_h, zero-order hold gives the discrete system

    x_k = Ā x_{k-1} + B̄ u_k,   y_k = Re(C x_k) + D u_k,
    Ā = exp(Δ λ),   B̄ = (exp(Δ λ) - 1) / λ · b,

whose impulse response is the kernel  K_k = Re Σ_n C_n B̄_n Ā_n^k,  k = 0 .. L-1.

This file is copied into saved checkpoints (remote code): it imports only torch.
"""

from __future__ import annotations

import math

import torch


def real_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the SSM math runs in: float64 stays float64, everything else runs in float32
    (half precision loses the phase of Δλk and cuFFT's half path needs power-of-two sizes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zoh_discretize(modes: torch.Tensor, log_dt: torch.Tensor, input_vec: torch.Tensor):
    """Zero-order hold of a batch of diagonal systems.

    Ā = exp(Δ λ),  B̄ = expm1(Δ λ) / λ · b   (expm1 avoids cancellation for small Δλ).

    Args: modes λ (H, N) complex with Re λ < 0, log_dt log Δ (H,), input_vec b (H, N) complex.
    Returns: (log Ā = Δλ, B̄), both (H, N) complex.
    """
    dt_modes = torch.exp(log_dt).unsqueeze(-1) * modes
    input_bar = torch.expm1(dt_modes) / modes * input_vec
    return dt_modes, input_bar


def complex_exp(exponent: torch.Tensor) -> torch.Tensor:
    """exp(z) = e^{Re z} (cos Im z + i sin Im z), through `torch.polar`: the same values as
    `torch.exp` on complex input (to rounding), about twice as fast on CPU."""
    return torch.polar(torch.exp(exponent.real), exponent.imag)


def vandermonde_kernel(log_a_bar: torch.Tensor, weights: torch.Tensor, length: int) -> torch.Tensor:
    """K[c, h, k] = Re Σ_n W[c, h, n] · exp(k · log Ā[h, n])  for k = 0 .. length-1.

    The powers are split as k = s + j with s a multiple of a block size S ≈ sqrt(length):
    exp(k log Ā) = exp(s log Ā) · exp(j log Ā), so the sum is one batched complex matmul of
    (W ⊙ exp(s log Ā)) against exp(j log Ā). Memory is O(H·N·sqrt(L) + c·H·L) instead of the
    O(H·N·L) of a materialised Vandermonde matrix, and autograd keeps only these small factors.

    Args: log_a_bar (H, N) complex, weights (c, H, N) complex, length L >= 1.
    Returns: (c, H, L) real.
    """
    channels_out, num_channels, num_modes = weights.shape
    block = max(1, math.isqrt(length - 1) + 1)
    num_blocks = -(-length // block)
    real_dtype = log_a_bar.real.dtype
    offsets = torch.arange(block, device=log_a_bar.device, dtype=real_dtype)
    starts = torch.arange(num_blocks, device=log_a_bar.device, dtype=real_dtype) * block
    inner = complex_exp(log_a_bar.unsqueeze(-1) * offsets)  # (H, N, S)
    outer = complex_exp(log_a_bar.unsqueeze(-1) * starts)  # (H, N, M)
    # (c, H, N, M) -> (H, c*M, N): one row per (output, block start)
    scaled = (weights.unsqueeze(-1) * outer.unsqueeze(0)).permute(1, 0, 3, 2)
    scaled = scaled.reshape(num_channels, channels_out * num_blocks, num_modes)
    kernel = torch.matmul(scaled, inner).real  # (H, c*M, S)
    kernel = kernel.reshape(num_channels, channels_out, num_blocks * block)[..., :length]
    return kernel.transpose(0, 1)


def two_sided_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """Lay out a causal and an anti-causal kernel for one circular FFT convolution of size 2L.

    Args: kernel (c, H, L) with c = 1 (causal) or c = 2 (rows: forward k0, backward k1).
    Returns: (H, 2L) with k0 at lags 0..L-1 and k1 at lags -1..-L, so that
        y_t = Σ_{s<=t} k0[t-s] u_s + Σ_{s>t} k1[s-t-1] u_s.
    """
    forward = torch.nn.functional.pad(kernel[0], (0, kernel.shape[-1]))
    if kernel.shape[0] == 1:
        return forward
    backward = torch.nn.functional.pad(kernel[1].flip(-1), (kernel.shape[-1], 0))
    return forward + backward


def fft_convolution(inputs: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y = u * K along the last axis by FFT of size 2L, which pads away circular wrap-around.

    Args: inputs u (B, H, L) real, kernel (c, H, L) real as returned by `vandermonde_kernel`.
    Returns: (B, H, L) real.
    """
    length = inputs.shape[-1]
    spectrum_k = torch.fft.rfft(two_sided_kernel(kernel), n=2 * length)
    spectrum_u = torch.fft.rfft(inputs, n=2 * length)
    return torch.fft.irfft(spectrum_u * spectrum_k, n=2 * length)[..., :length]


def recurrence_step(state: torch.Tensor, inputs: torch.Tensor, a_bar, input_bar, output_vec):
    """One step of the discrete system: x_k = Ā x_{k-1} + B̄ u_k, y_k = Re(Σ_n C_n x_k,n).

    Args: state (B, H, N) complex, inputs u_k (B, H) real, a_bar and input_bar (H, N) complex,
    output_vec C (H, N) complex. Returns (y_k (B, H) real without the D term, new state).
    """
    new_state = a_bar * state + input_bar * inputs.unsqueeze(-1)
    return (new_state * output_vec).sum(-1).real, new_state


# Cost rule of the causal convolution, measured by bench/bench_edge.py ("convolution_cost").
# Per output element the chunked recurrence does about T + 4N real multiply-adds (Toeplitz block,
# chunk-end states, carried readout), the FFT path about log2(2L) butterflies of three transforms;
# the chunked path is taken when  T + 4N <= FFT_COST_PER_LOG2 · log2(2L).
CHUNK_MIN = 32
FFT_COST_PER_LOG2 = 9.0


def convolution_chunk(num_modes: int, length: int, force: bool = False) -> int | None:
    """Chunk size T for `chunked_convolution`, or None when the FFT is expected to be cheaper.

    T is the power of two >= max(CHUNK_MIN, 2N) (the Toeplitz block then costs about what the
    state matmuls cost), capped at the sequence length rounded up to a power of two.
    """
    chunk = max(CHUNK_MIN, 1 << max(0, 2 * num_modes - 1).bit_length())
    chunk = min(chunk, 1 << max(0, length - 1).bit_length())
    if force or chunk + 4 * num_modes <= FFT_COST_PER_LOG2 * math.log2(2 * length):
        return chunk
    return None


def chunked_convolution(inputs: torch.Tensor, log_a_bar: torch.Tensor, weights: torch.Tensor, chunk: int):
    """y = K * u for a causal kernel K_k = Re Σ_n W_n Ā_n^k, by a chunked recurrence whose cost
    grows with N instead of the FFT's log L: O(B·H·L·(T + 4N)) real multiply-adds for chunk T.

    With s_n(t) = Σ_{j<=t} Ā_n^{t-j} u_j (so y_t = Re Σ_n W_n s_n(t)), split time into chunks of T:
      inside a chunk, a (T, T) lower-triangular Toeplitz matrix of K_0..K_{T-1} (one matmul);
      the state S_c = s(end of chunk c) = Ā^T S_{c-1} + Σ_j Ā^{T-1-j} u_{c,j} (a matmul, then a
      short scan over the L/T chunks); and the carried part Re Σ_n W_n Ā_n^{t+1} S_{c-1,n}
      (a matmul). The complex matmuls run as real ones on (re, im) blocks. Differentiable.

    Sequence-major, the model's layout: one gather into per-channel blocks on the way in, a view
    on the way out (the FFT path works on (B, H, L) instead).

    Args: inputs u (B, L, H) real, log_a_bar (H, N) complex, weights W (H, N) complex, chunk T >= 1.
    Returns: (B, L, H) real (a view), equal to `fft_convolution` of u^T with
    `vandermonde_kernel(log Ā, W[None], L)`, transposed back.
    """
    batch, length, channels = inputs.shape
    num_chunks = -(-length // chunk)
    num_modes = log_a_bar.shape[-1]
    padded = inputs
    if num_chunks * chunk != length:  # causal: a zero tail changes no output before it
        padded = torch.nn.functional.pad(inputs, (0, 0, 0, num_chunks * chunk - length))
    # rows ordered (batch, chunk) per channel: one large matmul per channel, and the result maps
    # back to (B, L, H) as a view
    # one 2-D transpose (B*L, H) -> (H, B*L): far faster than a general permute, and bmm would
    # otherwise gather a strided view again per channel and per matmul
    blocks = padded.reshape(-1, channels).t().contiguous().reshape(channels, -1, chunk)
    offsets = torch.arange(chunk, device=inputs.device, dtype=inputs.dtype)
    powers = complex_exp(log_a_bar.unsqueeze(-1) * offsets)  # Ā^t, (H, N, T)

    kernel = (weights.unsqueeze(-1) * powers).sum(1).real  # K_0..K_{T-1}, (H, T)
    lags = torch.arange(chunk, device=inputs.device)
    lag = lags.unsqueeze(0) - lags.unsqueeze(1)  # [j, t] = t - j
    toeplitz = torch.where(lag >= 0, kernel[:, lag.clamp(min=0)], kernel.new_zeros(()))  # (H, j, t)
    outputs = torch.bmm(blocks, toeplitz)  # in-chunk part, (H, B*C, T)
    if num_chunks > 1:
        # chunk-end states Σ_j Ā^{T-1-j} u_j, as interleaved (re, im) columns that view as complex
        to_end = torch.view_as_real(powers.flip(-1).transpose(1, 2)).reshape(channels, chunk, 2 * num_modes)
        local = torch.bmm(blocks, to_end).reshape(channels, batch, num_chunks, num_modes, 2)
        local = torch.view_as_complex(local)  # (H, B, C, N)
        a_chunk = complex_exp(log_a_bar * chunk).unsqueeze(1)  # Ā^T, (H, 1, N)
        entering = [torch.zeros_like(local[:, :, 0])]
        for index in range(num_chunks - 1):  # the state entering each chunk
            entering.append(torch.addcmul(local[:, :, index], a_chunk, entering[-1]))
        entering = torch.view_as_real(torch.stack(entering, dim=2)).reshape(channels, -1, 2 * num_modes)
        readout = weights.unsqueeze(-1) * powers * complex_exp(log_a_bar).unsqueeze(-1)  # W Ā^{t+1}, (H, N, T)
        # Re(W Ā^{t+1} S) = [Re S, Im S] · [Re, -Im](W Ā^{t+1}), rows interleaved like S's (re, im)
        readout = torch.view_as_real(torch.conj_physical(readout).transpose(1, 2)).reshape(channels, chunk, -1)
        outputs = outputs.baddbmm_(entering, readout.transpose(1, 2))  # in place: bmm's backward does not need it
    return outputs.reshape(channels, batch, num_chunks * chunk).permute(1, 2, 0)[:, :length]
