"""Per-layer Triton source generation for the block-sparse products of `triton_kernels`.

Each sparse layer gets its own kernels. A kernel is fully described by a `KernelSpec`:

    op         "fwd" (y = x W^T + b) | "grad_input" (dx = dy W) | "sddmm" (dW = dy^T x on W's blocks)
    block      B, the square block size (16, 32 or 64)
    nnz        blocks per block-row of the matrix the kernel walks (W for fwd/sddmm, W^T for
               grad_input) when that layout is balanced, else None (row pointers are read)
    dtype      float32 | float16 | bfloat16 (accumulation is always float32)
    bias       fwd only: the bias add is emitted or not
    precision  tl.dot input_precision for float32 ("ieee" exact, "tf32" when torch allows TF32)
    index64    64-bit offsets, for tensors with 2**31 elements or more
    interpret  built for the Triton interpreter (CPU tests): one fixed BLOCK_M, no autotuning

Why source text and not only `tl.constexpr` arguments: the specialised parts are structural
(the balanced loop has a literal trip count and no row-pointer loads, the bias and 64-bit-offset
code exists or not, the autotune decorator is there or not) and reading the exact kernel a layer
runs is the first thing one wants when tuning or debugging it. `kernel_source(spec)` returns that
text; `get_kernel(spec)` compiles it once (cached per spec, so two layers with the same spec share
one kernel and Triton's own JIT cache) and keeps it inspectable in `linecache`, so Triton error
messages and tracebacks point at real generated lines.

GPU design (see `autotune_configs`): one program computes a BLOCK_M x B output tile with
`tl.dot` on B x B blocks, reading the block's column index from a look-up table built once by
`make_layout`; loads are row-major along the contiguous axis (coalesced, cp.async-pipelined on
sm_80+ with num_stages > 1); balanced layouts give every program the same fixed trip count.
The autotune space is BLOCK_M in {16, 32, 64, 128} x (4 warps with num_stages in {2, 3, 4}, or
8 warps with 3 stages for large tiles), filtered by a shared-memory budget and pruned at launch
to BLOCK_M <= next_power_of_2(M): at most 14 configs, keyed on (M bucket, N, K).

    >>> spec = KernelSpec(op="fwd", block=32, nnz=4, dtype="float32", bias=True, interpret=True)
    >>> print(kernel_source(spec).splitlines()[0])
    # sparsegraph generated Triton kernel: fwd, block 32, 4 blocks per row (balanced), float32, bias, interpreter
    >>> "for i in range(4):" in kernel_source(spec)
    True
"""
from __future__ import annotations

import linecache
import threading
from dataclasses import dataclass

OPS = ("fwd", "grad_input", "sddmm")
BLOCKS = (16, 32, 64)
DTYPES = {"float32": ("tl.float32", "fp32", 4), "float16": ("tl.float16", "fp16", 2),
          "bfloat16": ("tl.bfloat16", "bf16", 2)}
PRECISIONS = ("ieee", "tf32")
INTERPRET_BLOCK_M = 32        # the one tile height used under TRITON_INTERPRET=1
SMEM_BUDGET = 96 * 1024       # bytes of pipelined tiles a config may use (fits sm_80/sm_86/sm_89/sm_90)
SDDMM_CHUNK_ALIGN = 128       # M_CHUNK is a multiple of the largest BLOCK_M


@dataclass(frozen=True)
class KernelSpec:
    """Everything a generated kernel is specialised on (the cache key). See the module docstring."""
    op: str
    block: int
    nnz: int | None
    dtype: str
    bias: bool = False
    precision: str = "ieee"
    index64: bool = False
    interpret: bool = False

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"KernelSpec.op must be one of {OPS}, got {self.op!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"Triton block-sparse kernels support block sizes {BLOCKS}, got {self.block}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KernelSpec.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"KernelSpec.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.nnz is not None and (self.nnz < 1 if self.op == "sddmm" else self.nnz < 0):
            raise ValueError(f"KernelSpec.nnz must be a block count >= {int(self.op == 'sddmm')} or None, "
                             f"got {self.nnz}")
        if self.bias and self.op != "fwd":
            raise ValueError("KernelSpec.bias is only meaningful for op='fwd'")

    @property
    def name(self) -> str:
        """The generated function's name, e.g. sg_bsr_fwd_b32_n4_fp32_bias."""
        parts = [f"sg_bsr_{self.op}", f"b{self.block}", "ragged" if self.nnz is None else f"n{self.nnz}",
                 DTYPES[self.dtype][1]]
        if self.dtype == "float32":
            parts.append(self.precision)
        if self.bias:
            parts.append("bias")
        if self.index64:
            parts.append("i64")
        if self.interpret:
            parts.append("interp")
        return "_".join(parts)

    def describe(self) -> str:
        rows = ("ragged rows (row pointers)" if self.nnz is None
                else f"{self.nnz} blocks per row (balanced)")
        extra = [self.dtype] + (["bias"] if self.bias else []) + (["64-bit offsets"] if self.index64 else [])
        if self.dtype == "float32" and self.precision == "tf32":
            extra.append("tf32 dot")
        if self.interpret:
            extra.append("interpreter")
        return f"{self.op}, block {self.block}, {rows}, " + ", ".join(extra)


# ---------------------------------------------------------------------------------------------
# Autotuning space (GPU only)

def autotune_configs(spec: KernelSpec) -> list[tuple[int, int, int]]:
    """(BLOCK_M, num_warps, num_stages) triples for the GPU autotuner.

    Shared memory per pipeline stage: fwd/grad_input hold a (BLOCK_M, B) input tile and a (B, B)
    weight block; sddmm holds two (BLOCK_M, B) tiles. Configs over SMEM_BUDGET are dropped, and
    8 warps (with the default 3-stage pipeline) are only offered when a (BLOCK_M, B) operand tile
    has at least 64*64 elements of work for them; for exact fp32 (FMA, no tensor cores) such tiles
    get only 8 warps, as 4 warps spill registers there (see `resource_report`). At most 14 configs.

        >>> autotune_configs(KernelSpec("fwd", 64, None, "float32"))[:3]
        [(16, 4, 2), (16, 4, 3), (16, 4, 4)]
    """
    B, elt = spec.block, DTYPES[spec.dtype][2]
    fma = spec.dtype == "float32" and spec.precision == "ieee"   # exact fp32: tl.dot on CUDA cores
    out = []
    for bm in (16, 32, 64, 128):
        tile = bm * B                                         # elements of one (BLOCK_M, B) operand tile
        per_stage = (2 * bm * B if spec.op == "sddmm" else bm * B + B * B) * elt
        for warps, depths in ((4, (2, 3, 4)), (8, (3,))):
            if (warps == 8 and tile < 64 * 64) or (warps == 4 and fma and tile >= 64 * 64):
                continue
            for stages in depths:
                if stages * per_stage <= SMEM_BUDGET:
                    out.append((bm, warps, stages))
    return out


def prune_by_m(configs, named_args, **kwargs):
    """Autotune early pruning: no tile taller than the next power of two of M (at least 16)."""
    m = int(named_args["M"])
    cap = max(16, 1 << max(0, m - 1).bit_length())
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs[:1]


# ---------------------------------------------------------------------------------------------
# Source templates. {B}, {BB} are the block size and its square; {ACC} etc. are filled per spec.

_PARAMS = {   # (name, kind): kind in data | index | out | int | lead (leading stride) | unit (inner stride)
    "fwd": [("X", "data"), ("V", "data"), ("CROW", "index"), ("COL", "index"), ("BIAS", "data"), ("Y", "out"),
            ("M", "int"), ("N", "int"), ("K", "int"), ("M_BUCKET", "int"),
            ("stride_xm", "lead"), ("stride_xk", "unit"), ("stride_ym", "lead"), ("stride_yn", "unit")],
    "grad_input": [("DY", "data"), ("V", "data"), ("CROW_T", "index"), ("ROW_T", "index"), ("PERM_T", "index"),
                   ("DX", "out"), ("M", "int"), ("N", "int"), ("K", "int"), ("M_BUCKET", "int"),
                   ("stride_dym", "lead"), ("stride_dyn", "unit"), ("stride_dxm", "lead"), ("stride_dxk", "unit")],
    "sddmm": [("DY", "data"), ("X", "data"), ("ROW", "index"), ("COL", "index"), ("OUT", "acc"),
              ("M", "int"), ("N", "int"), ("K", "int"), ("M_BUCKET", "int"), ("M_CHUNK", "int"), ("NNZB", "int"),
              ("stride_dym", "lead"), ("stride_dyn", "unit"), ("stride_xm", "lead"), ("stride_xk", "unit")],
}


def kernel_params(spec: KernelSpec) -> list[tuple[str, str]]:
    """The generated kernel's runtime parameters (name, kind), in call order (BLOCK_M excluded)."""
    params = _PARAMS[spec.op]
    if spec.op == "fwd" and not spec.bias:
        params = [p for p in params if p[0] != "BIAS"]
    return list(params)


_FWD_BODY = """\
    # y[m, r*B:(r+1)*B] = sum over W's blocks j in block-row r of  x[m, col[j]*B:(col[j]+1)*B] @ V[j]^T
    pid_r = tl.program_id(0)                                   # block-row of W = block-column of y
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M){I64}          # (BLOCK_M,)
    offs_b = tl.arange(0, {B})                                  # (B,)
    m_in = offs_m < M
    acc = tl.zeros((BLOCK_M, {B}), dtype=tl.float32)            # (BLOCK_M, B)
{LOOP}
        c = tl.load(COL + j)                                    # block-column of W read from the LUT
        offs_k = c * {B} + offs_b                                # (B,)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_in[:, None] & (offs_k[None, :] < K), other=0.0)       # (BLOCK_M, B)
        v = tl.load(V + {J} * {BB} + offs_b[:, None] * {B} + offs_b[None, :])  # (B, B) block of W
        acc += tl.dot(x, tl.trans(v){PREC})                        # (BLOCK_M, B)
    offs_n = pid_r * {B} + offs_b                                # (B,)
{BIAS}\
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to({OUT}),
             mask=m_in[:, None] & (offs_n[None, :] < N))
"""

_BIAS = """\
    acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
"""

_GRAD_INPUT_BODY = """\
    # dx[m, c*B:(c+1)*B] = sum over W^T's blocks t in block-row c of  dy[m, row_t[t]*B:...] @ V[perm_t[t]]
    pid_c = tl.program_id(0)                                   # block-column of W = block-column of dx
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M){I64}          # (BLOCK_M,)
    offs_b = tl.arange(0, {B})                                  # (B,)
    m_in = offs_m < M
    acc = tl.zeros((BLOCK_M, {B}), dtype=tl.float32)            # (BLOCK_M, B)
{LOOP}
        r = tl.load(ROW_T + t)                                  # block-row of W holding this block
        j = tl.load(PERM_T + t)                                 # its index in W's values
        offs_n = r * {B} + offs_b                                # (B,)
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_in[:, None] & (offs_n[None, :] < N), other=0.0)     # (BLOCK_M, B)
        v = tl.load(V + {J} * {BB} + offs_b[:, None] * {B} + offs_b[None, :])  # (B, B) block of W
        acc += tl.dot(dy, v{PREC})                                 # (BLOCK_M, B)
    offs_k = pid_c * {B} + offs_b                                # (B,)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to({OUT}),
             mask=m_in[:, None] & (offs_k[None, :] < K))
"""

_SDDMM_BODY = """\
    # OUT[s, j] = dy[chunk s, r*B:(r+1)*B]^T @ x[chunk s, c*B:(c+1)*B], (r, c) = position of W's block j
    j = tl.program_id(0)                                       # W's block (index into its values)
    s = tl.program_id(1)                                       # chunk of M reduced by this program
{ROWCOL}
    offs_b = tl.arange(0, {B})                                  # (B,)
    offs_n = r * {B} + offs_b                                    # (B,) rows of W = columns of dy
    offs_k = c * {B} + offs_b                                    # (B,) columns of W = columns of x
    n_in = offs_n < N
    k_in = offs_k < K
    acc = tl.zeros(({B}, {B}), dtype=tl.float32)                 # (B, B)
    m_lo = s * M_CHUNK
    m_hi = tl.minimum(m_lo + M_CHUNK, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M){I64}                    # (BLOCK_M,)
        m_in = offs_m < m_hi
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_in[:, None] & n_in[None, :], other=0.0)             # (BLOCK_M, B)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_in[:, None] & k_in[None, :], other=0.0)              # (BLOCK_M, B)
        acc += tl.dot(tl.trans(dy), x{PREC})                       # (B, B)
    out = OUT + ({S} * NNZB + j) * {BB}
    tl.store(out + offs_b[:, None] * {B} + offs_b[None, :], acc)
"""


def _loop(spec: KernelSpec, pid: str, ptr: str, var: str) -> str:
    """The block loop over one block-row: literal trip count when balanced, LUT bounds otherwise."""
    if spec.nnz is not None:
        return (f"    start = {pid} * {spec.nnz}\n"
                f"    for i in range({spec.nnz}):                                   "
                f"# fixed trip count: every block-row has {spec.nnz} blocks\n"
                f"        {var} = start + i")
    return (f"    start = tl.load({ptr} + {pid})                             # row pointers (LUT)\n"
            f"    end = tl.load({ptr} + {pid} + 1)\n"
            f"    for {var} in range(start, end):")


def _decorators(spec: KernelSpec) -> str:
    if spec.interpret:
        return f"# interpreter build: no autotuning, BLOCK_M = {INTERPRET_BLOCK_M}\n@triton.jit\n"
    configs = ",\n".join(f"        triton.Config({{'BLOCK_M': {bm}}}, num_warps={w}, num_stages={s})"
                         for bm, w, s in autotune_configs(spec))
    return ("@triton.autotune(\n"
            f"    configs=[\n{configs},\n    ],\n"
            "    key=['M_BUCKET', 'N', 'K'],\n"
            "    prune_configs_by={'early_config_prune': prune_by_m},\n"
            ")\n@triton.jit\n")


def kernel_source(spec: KernelSpec) -> str:
    """The Python/Triton source of the kernel for `spec` (deterministic text)."""
    B = spec.block
    tl_dtype = DTYPES[spec.dtype][0]
    prec = f', input_precision="{spec.precision}"' if spec.dtype == "float32" else ""
    fill = dict(B=B, BB=B * B, OUT=tl_dtype, PREC=prec,
                I64=".to(tl.int64)" if spec.index64 else "",
                J="tl.cast(j, tl.int64)" if spec.index64 else "j", S="tl.cast(s, tl.int64)" if spec.index64 else "s")
    if spec.op == "fwd":
        body = _FWD_BODY.format(LOOP=_loop(spec, "pid_r", "CROW", "j"), BIAS=_BIAS if spec.bias else "", **fill)
    elif spec.op == "grad_input":
        body = _GRAD_INPUT_BODY.format(LOOP=_loop(spec, "pid_c", "CROW_T", "t"), **fill)
    else:
        rowcol = (f"    r = j // {spec.nnz}                                         # balanced: no row LUT\n"
                  if spec.nnz is not None else
                  "    r = tl.load(ROW + j)                                   # block-row of W (LUT)\n")
        rowcol += "    c = tl.load(COL + j)                                   # block-column of W (LUT)"
        body = _SDDMM_BODY.format(ROWCOL=rowcol, **fill)
    params = ", ".join(name for name, _ in kernel_params(spec))
    header = (f"# sparsegraph generated Triton kernel: {spec.describe()}\n"
              f"# spec: {spec!r}\n"
              "import triton\n"
              "import triton.language as tl\n\n"
              "from sparsegraph.backends.triton_codegen import prune_by_m\n\n\n")
    text = header + _decorators(spec) + f"def {spec.name}(\n    {params},\n    BLOCK_M: tl.constexpr,\n):\n" + body
    return _align_comments(text)


def _align_comments(text: str, column: int = 72) -> str:
    """Put trailing `# ...` comments of code lines at one column (the templates hold no '#' in strings)."""
    lines = []
    for line in text.splitlines():
        code, sep, comment = line.partition("  #")
        if sep and code.strip() and not code.lstrip().startswith("#"):
            line = f"{code.rstrip():<{column - 2}}  # {comment.strip()}"
        lines.append(line)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Compilation cache

@dataclass
class GeneratedKernel:
    """A compiled generated kernel: `fn` is Triton's JITFunction / Autotuner / InterpretedFunction."""
    spec: KernelSpec
    source: str
    fn: object

    def launch(self, grid, *args) -> None:
        """Launch on `grid` (a tuple or a function of the chosen config's meta-parameters)."""
        if self.spec.interpret:
            self.fn[grid](*args, BLOCK_M=INTERPRET_BLOCK_M)
        else:
            self.fn[grid](*args)


_CACHE: dict[KernelSpec, GeneratedKernel] = {}
_LOCK = threading.Lock()


def get_kernel(spec: KernelSpec) -> GeneratedKernel:
    """The kernel for `spec`, generated and compiled on first use, then reused from the cache."""
    with _LOCK:
        hit = _CACHE.get(spec)
        if hit is None:
            hit = _CACHE[spec] = _build(spec)
        return hit


def cached_specs() -> tuple[KernelSpec, ...]:
    """The specs compiled so far in this process, in compilation order."""
    with _LOCK:
        return tuple(_CACHE)


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def _build(spec: KernelSpec) -> GeneratedKernel:
    from triton import knobs

    source = kernel_source(spec)
    filename = f"<sparsegraph-triton:{spec.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": f"sparsegraph.backends.generated.{spec.name}"}
    with knobs.runtime.scope():              # decorate for the spec's mode, whatever the environment says
        knobs.runtime.interpret = spec.interpret
        exec(compile(source, filename, "exec"), namespace)
    return GeneratedKernel(spec, source, namespace[spec.name])


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU target (works without a GPU: checks the GPU path compiles)

_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def compile_for_gpu(spec: KernelSpec, capability: int = 80, block_m: int = 64, num_warps: int = 4,
                    num_stages: int = 3):
    """Compile the kernel for a CUDA target (e.g. capability 80 = A100) without launching it.

    Uses the argument specialisation that Triton gives a launch on contiguous, 16-byte aligned
    tensors whose sizes are multiples of 16 (inner strides 1; pointers, leading strides and M, N, K
    divisible by 16), the common case for real layers. Returns Triton's CompiledKernel:
    `.asm["ptx"]`, `.asm["ttgir"]`, `.metadata.shared` (bytes of shared memory).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if spec.interpret:
        raise ValueError("compile_for_gpu needs a spec with interpret=False")
    from triton.runtime.jit import JITFunction

    fn = get_kernel(spec).fn
    while not isinstance(fn, JITFunction):   # Autotuner -> JITFunction
        fn = fn.fn
    sig, const, attrs = {}, {"BLOCK_M": block_m}, {}
    int_t = "i64" if spec.index64 else "i32"
    for i, (name, kind) in enumerate(kernel_params(spec)):
        if kind == "unit":
            sig[name], const[name] = "constexpr", 1
            continue
        sig[name] = {"data": _PTR[spec.dtype], "out": _PTR[spec.dtype], "acc": "*fp32",
                     "index": "*i32"}.get(kind, int_t)
        if kind in ("data", "out", "acc", "index", "lead") or name in ("M", "N", "K"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    sig["BLOCK_M"] = "constexpr"
    src = ASTSource(fn, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(spec: KernelSpec, capability: int = 80, block_m: int = 64, num_warps: int = 4,
                   num_stages: int = 3) -> dict:
    """Static GPU resources of one config, from the compiled cubin (no GPU needed).

    Keys: shared (bytes), registers (per thread), local (spill bytes per thread), tensor_cores
    (tl.dot lowered to mma/wgmma), async_copy (loads pipelined with cp.async).
    """
    import re
    import subprocess
    import tempfile

    from triton import knobs

    compiled = compile_for_gpu(spec, capability, block_m, num_warps, num_stages)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|LOCAL|STACK):(\d+)", text))
    return {"shared": compiled.metadata.shared, "registers": int(usage["REG"]),
            "local": int(usage["LOCAL"]) + int(usage["STACK"]),
            "tensor_cores": "mma.sync" in ptx or "wgmma" in ptx, "async_copy": "cp.async" in ptx}


def resource_report(capability: int = 80, dtypes=("bfloat16", "float16", "float32")) -> list[dict]:
    """`resource_usage` of every autotune config of every (op, block, dtype), ragged layouts.

    float32 is compiled with precision "ieee" (torch's default: TF32 off).
    """
    rows = []
    for op in OPS:
        for dtype in dtypes:
            for block in BLOCKS:
                spec = KernelSpec(op, block, None, dtype)
                usage = [resource_usage(spec, capability, *cfg) for cfg in autotune_configs(spec)]
                rows.append({"op": op, "dtype": dtype, "block": block, "configs": len(usage),
                             "max_registers": max(u["registers"] for u in usage),
                             "max_spill_bytes": max(u["local"] for u in usage),
                             "max_shared_kib": round(max(u["shared"] for u in usage) / 1024, 1),
                             "tensor_cores": all(u["tensor_cores"] for u in usage),
                             "async_copy": all(u["async_copy"] for u in usage)})
                print(f"  compiled {op} {dtype} b{block}: {len(usage)} configs", flush=True)
    return rows


if __name__ == "__main__":     # python -m sparsegraph.backends.triton_codegen [capability]
    import sys

    cap = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    print(f"Static resources of every autotune config, compiled for sm_{cap} (no GPU needed)")
    table = resource_report(cap)
    cols = list(table[0])
    print(" | ".join(cols))
    for row in table:
        print(" | ".join(str(row[c]) for c in cols))
