"""GPU self-test of the Triton kernels: each against its torch reference at model-sized shapes, timed.

Run on a CUDA machine: ``python -m kernels.selftest`` (``--quick`` for small shapes). Prints one
table row per case: max error vs the reference, Triton and reference times, the speed-up, and the
bytes each Triton call must move over its time (compare with the HBM bandwidth, ~3 TB/s on an H100).
Exits 1 if any kernel disagrees with its reference. Without CUDA it runs the quick shapes in
Triton's CPU interpreter (set TRITON_INTERPRET=1), which only checks that the script works.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.activation import silu_and_mul_ref
from kernels.kv_cache_ops import gather_blocks_ref, scatter_blocks_ref, write_kv_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_embedding_ref

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@dataclass
class Shapes:
    """Model-ish sizes: Llama-3-8B's hidden/MLP widths and Qwen3-0.6B-like attention heads.

    ``prefill_tokens`` and ``small_hidden`` are the norm shapes of one Qwen3-0.6B 8k-token prefill step.
    """

    tokens: int = 4096
    hidden: int = 4096
    prefill_tokens: int = 8192
    small_hidden: int = 1024
    intermediate: int = 14336
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    num_layers: int = 4
    decode_batch: int = 256
    decode_context: int = 640
    prefill_seqs: int = 4
    prefill_len: int = 1024
    offload_blocks: int = 64


QUICK = Shapes(tokens=64, hidden=256, prefill_tokens=96, small_hidden=128, intermediate=512, num_heads=4, num_kv_heads=2, head_dim=32,
               num_layers=2, decode_batch=4, decode_context=40, prefill_seqs=2, prefill_len=24,
               offload_blocks=3)


@dataclass
class Result:
    name: str
    max_err: float
    ok: bool
    triton_ms: float
    ref_ms: float
    bytes_moved: int


def _time_ms(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _max_err(a, b) -> float:
    if isinstance(a, tuple):
        return max(_max_err(x, y) for x, y in zip(a, b))
    return (a.float() - b.float()).abs().max().item()


def _close(a, b, dtype: torch.dtype) -> bool:
    """Within ``TOL[dtype]``, both absolute and relative (as ``torch.allclose``)."""
    if isinstance(a, tuple):
        return all(_close(x, y, dtype) for x, y in zip(a, b))
    return torch.allclose(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compare(name, triton_fn, ref_fn, dtype, bytes_moved, device) -> Result:
    ours, theirs = triton_fn(), ref_fn()
    return Result(name, _max_err(ours, theirs), _close(ours, theirs, dtype), _time_ms(triton_fn, device), _time_ms(ref_fn, device), bytes_moved)


def _compare_in_place(name, triton_fn, ref_fn, cache, dtype, bytes_moved, device) -> Result:
    """Ops that write into ``cache``: run each on its own copy, compare the copies."""
    ours, theirs = cache.clone(), cache.clone()
    triton_fn(ours)
    ref_fn(theirs)
    return Result(name, _max_err(ours, theirs), _close(ours, theirs, dtype), _time_ms(lambda: triton_fn(ours), device),
                  _time_ms(lambda: ref_fn(theirs), device), bytes_moved)


def elementwise_cases(s: Shapes, dtype: torch.dtype, device: str) -> list[Result]:
    from kernels.activation_triton import silu_and_mul_triton
    from kernels.rms_norm_triton import rms_norm_triton
    from kernels.rotary_triton import rotary_embedding_triton

    t = s.tokens
    x = torch.randn(t, s.hidden, device=device, dtype=dtype)
    res = torch.randn(t, s.hidden, device=device, dtype=dtype)
    w = torch.rand(s.hidden, device=device, dtype=dtype)
    gate_up = torch.randn(t, 2 * s.intermediate, device=device, dtype=dtype)
    q = torch.randn(t, s.num_heads, s.head_dim, device=device, dtype=dtype)
    k = torch.randn(t, s.num_kv_heads, s.head_dim, device=device, dtype=dtype)
    positions = torch.randint(0, 8192, (t,), device=device)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim)
    freqs = torch.arange(8192, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return [
        _compare(f"rms_norm [{t}x{s.hidden}]", lambda: rms_norm_triton(x, w, 1e-6),
                 lambda: rms_norm_ref(x, w, 1e-6), dtype, 2 * _nbytes(x), device),
        _compare(f"rms_norm+residual [{t}x{s.hidden}]", lambda: rms_norm_triton(x, w, 1e-6, res),
                 lambda: rms_norm_ref(x, w, 1e-6, res), dtype, 4 * _nbytes(x), device),
        _compare(f"silu_and_mul [{t}x{2 * s.intermediate}]", lambda: silu_and_mul_triton(gate_up),
                 lambda: silu_and_mul_ref(gate_up), dtype, _nbytes(gate_up) * 3 // 2, device),
        _compare(f"rotary [{t}x({s.num_heads}+{s.num_kv_heads})x{s.head_dim}]",
                 lambda: rotary_embedding_triton(positions, q, k, cache),
                 lambda: rotary_embedding_ref(positions, q, k, cache), dtype, 2 * _nbytes(q, k), device),
    ]


def norm_cases(s: Shapes, dtype: torch.dtype, device: str) -> list[Result]:
    """The RMSNorm shapes of a Qwen3-0.6B step: prefill hidden norm, decode-batch norm, per-head q norm."""
    from kernels.rms_norm_triton import rms_norm_triton

    t, h = s.prefill_tokens, s.small_hidden
    x = torch.randn(t, h, device=device, dtype=dtype)
    res = torch.randn(t, h, device=device, dtype=dtype)
    w = torch.rand(h, device=device, dtype=dtype)
    x_decode = x[: s.decode_batch]
    q_size = s.num_heads * s.head_dim
    qkv_width = q_size + 2 * s.num_kv_heads * s.head_dim
    qkv = torch.randn(t, qkv_width, device=device, dtype=dtype)
    q = qkv[:, :q_size].view(t, s.num_heads, s.head_dim)
    w_head = torch.rand(s.head_dim, device=device, dtype=dtype)
    q_bytes = q.numel() * q.element_size()
    return [
        _compare(f"rms_norm+residual [{t}x{h}]", lambda: rms_norm_triton(x, w, 1e-6, res),
                 lambda: rms_norm_ref(x, w, 1e-6, res), dtype, 4 * _nbytes(x), device),
        _compare(f"rms_norm [{s.decode_batch}x{h}]", lambda: rms_norm_triton(x_decode, w, 1e-6),
                 lambda: rms_norm_ref(x_decode, w, 1e-6), dtype, 2 * _nbytes(x_decode), device),
        _compare(f"q-norm [{t},{s.num_heads},{s.head_dim}] of [{t}x{qkv_width}]",
                 lambda: rms_norm_triton(q, w_head, 1e-6), lambda: rms_norm_ref(q, w_head, 1e-6), dtype,
                 2 * q_bytes, device),
    ]


def kv_cache_cases(s: Shapes, dtype: torch.dtype, device: str, block_size: int = 16) -> list[Result]:
    from kernels.kv_cache_ops_triton import gather_blocks_triton, scatter_blocks_triton, write_kv_triton

    num_blocks = s.tokens // block_size + s.offload_blocks * 2 + 1
    kv = torch.randn(num_blocks, s.num_layers, 2, block_size, s.num_kv_heads, s.head_dim, device=device,
                     dtype=dtype)
    k = torch.randn(s.tokens, s.num_kv_heads, s.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, device=device)[: s.tokens]
    ids = torch.randperm(num_blocks, device=device)[: s.offload_blocks]
    packed = gather_blocks_ref(kv, ids)
    return [
        _compare_in_place(f"write_kv [{s.tokens} tokens]", lambda c: write_kv_triton(k, v, c, 1, slots),
                          lambda c: write_kv_ref(k, v, c, 1, slots), kv, dtype, 2 * _nbytes(k, v), device),
        _compare(f"gather_blocks [{s.offload_blocks} x {_nbytes(kv[0]) >> 10} KiB]",
                 lambda: gather_blocks_triton(kv, ids), lambda: gather_blocks_ref(kv, ids), dtype,
                 2 * _nbytes(packed), device),
        _compare_in_place(f"scatter_blocks [{s.offload_blocks} blocks]",
                          lambda c: scatter_blocks_triton(c, ids, packed), lambda c: scatter_blocks_ref(c, ids, packed),
                          kv, dtype, 2 * _nbytes(packed), device),
    ]


def _paged_batch(s: Shapes, seqs: list[tuple[int, int]], dtype, device, block_size: int):
    """(args of paged_attention, bytes of K/V it must read) for sequences of (context, new tokens)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    blocks_per_seq = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(blocks_per_seq)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    kv = torch.randn(num_blocks, 1, 2, block_size, s.num_kv_heads, s.head_dim, device=device, dtype=dtype)
    q_lens = [n for _, n in seqs]
    q = torch.randn(sum(q_lens), s.num_heads, s.head_dim, device=device, dtype=dtype)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
    args = (q, kv, 0, tables.to(device), seq_lens.to(device), qsl.to(device), max(q_lens), int(seq_lens.max()),
            s.head_dim**-0.5)
    kv_bytes = int(seq_lens.sum()) * 2 * s.num_kv_heads * s.head_dim * kv.element_size()
    return args, kv_bytes + 2 * _nbytes(q)


def attention_cases(s: Shapes, dtype: torch.dtype, device: str) -> list[Result]:
    from kernels.paged_attention_triton import paged_attention_triton

    ctx = s.decode_context
    batches = {
        f"decode block16 [{s.decode_batch} x ctx {ctx}]": ([(ctx - 1, 1)] * s.decode_batch, 16),
        f"decode block256 [{s.decode_batch} x ctx {ctx}]": ([(ctx - 1, 1)] * s.decode_batch, 256),
        f"prefill [{s.prefill_seqs} x {s.prefill_len}]": ([(0, s.prefill_len)] * s.prefill_seqs, 16),
        f"mixed [chunk {s.prefill_len} over ctx {ctx} + {s.decode_batch} decodes]":
            ([(ctx, s.prefill_len)] + [(ctx - 1, 1)] * s.decode_batch, 16),
    }
    results = []
    for name, (seqs, block_size) in batches.items():
        args, nbytes = _paged_batch(s, seqs, dtype, device, block_size)
        results.append(_compare(f"paged_attention {name}", lambda: paged_attention_triton(*args),
                                lambda: paged_attention_ref(*args), dtype, nbytes, device))
    return results


def print_table(results: list[Result], dtype: torch.dtype) -> None:
    print(f"\n{'kernel (' + str(dtype).removeprefix('torch.') + ')':<62} {'max err':>9} {'ok':>3} "
          f"{'triton ms':>10} {'torch ms':>10} {'speed-up':>8} {'GB/s':>8}")
    for r in results:
        gbps = r.bytes_moved / (r.triton_ms * 1e-3) / 1e9
        print(f"{r.name:<62} {r.max_err:>9.2e} {'yes' if r.ok else 'NO':>3} {r.triton_ms:>10.4f} "
              f"{r.ref_ms:>10.4f} {r.ref_ms / r.triton_ms:>7.1f}x {gbps:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32",
                        help="comma-separated torch dtypes to test (default: %(default)s)")
    opts = parser.parse_args(argv)
    if torch.cuda.is_available():
        device, shapes = "cuda", QUICK if opts.quick else Shapes()
        print(f"device: {torch.cuda.get_device_name()}")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, shapes = "cpu", QUICK
        print("device: CPU, Triton interpreter (quick shapes; times are meaningless)")
    else:
        print("no CUDA device: run on a GPU, or set TRITON_INTERPRET=1 to smoke-test on CPU", file=sys.stderr)
        return 2
    all_ok = True
    for name in opts.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        torch.manual_seed(0)
        results = elementwise_cases(shapes, dtype, device) + norm_cases(shapes, dtype, device)
        results += kv_cache_cases(shapes, dtype, device)
        results += attention_cases(shapes, dtype, device)
        print_table(results, dtype)
        all_ok &= all(r.ok for r in results)
    print("\nALL OK" if all_ok else "\nMISMATCH: see rows marked NO")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
