"""C source of the CPU block-sparse kernels (built by `sparsegraph.backends.cpu` on first use).

Plain C11 with GCC vector extensions and OpenMP; no PyTorch headers, so it builds in about two
seconds with `gcc -O3 -march=native -fopenmp`. `BODY` is instantiated twice, for float and double,
in vectors of one register (64 bytes with AVX-512, 32 with AVX2: VL lanes) and register tiles sized
for the register file (32 or 16 registers). `sg_fma_peak` measures the CPU's fp32 FMA throughput.
Exported symbols (suffix _f32 / _f64):

  sg_rows_packed y (M, OUT) = x (M, IN) @ B + bias        b a multiple of the vector width: B's blocks
                 read (in, out), or (out, in) and transposed on the way; x in chunks of L2-resident
                 tiles, shared by the threads or, with many chunks, whole groups of rows to each thread
                 (linear layers, their dX)
  sg_rows        the same for any b, blocks repacked per call (narrow and ragged block sizes)
  sg_cols        Y (P, OUT, L) = B X (P, IN, L) + bias     lanes along L (im2col / transposed x)
  sg_sddmm_rows  dV[j] = G[:, rows of j]^T X[:, cols of j]  on B's nonzero blocks
  sg_sddmm_cols  dV[j] = sum_p G[p, rows of j] X[p, cols of j]^T
  sg_conv2d      y = conv2d(x, W, bias) for a block-sparse W (out, C kh kw), no im2col tensor: stride 1
                 reads the padded image (small images interleaved) through row offsets, output channels
                 along the vector for b a multiple of the vector width, else positions, in L2-sized
                 chunks of K; other strides build im2col tiles per thread

A block-sparse B is given as BSR row pointers `crow`, block columns `col` (int32), values
(nnzb, b, b) and an optional `perm` (value index of each block, for W^T read through W's values).
Every function returns 0, or 1 if a work buffer could not be allocated.
"""

HEADER = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define FN(n) CAT(n, SUF)
#define CHUNK(items, nt) ((items) / (8 * (nt)) > 1 ? (items) / (8 * (nt)) : 1)
/* The vector type is the widest the target keeps in registers: a wider GCC vector has no machine
 * mode there, so every variable of it lives on the stack (64-byte vectors on an AVX2 CPU ran the
 * linear kernels about 20x below their speed at 32 bytes). SG_NREG vector registers bound the register
 * tiles: with 16, the tables below halve them. */
#if defined(__AVX512F__)
#define SG_VBYTES 64
#elif defined(__AVX__)
#define SG_VBYTES 32
#else
#define SG_VBYTES 16
#endif
#if defined(__AVX512F__) || defined(__aarch64__)
#define SG_NREG 32
#else
#define SG_NREG 16
#endif
/* A parallel region entered only when it pays: with one thread GOMP's team start and barriers cost 2-3 us a
 * call (a one-row product of a GPT-2 layer at s = 0.9 takes 6-9 us), so below `par` the body runs directly,
 * its worksharing loops orphaned (each then runs whole on the calling thread). The body is written once, as
 * the last argument, its loops marked _Pragma("omp for ..."); `clauses` go to the parallel directive. */
#define SG_PRAGMA(x) _Pragma(#x)
#define SG_TEAM(par, clauses, ...)                                                              \
    do {                                                                                        \
        if (par) { SG_PRAGMA(omp parallel num_threads(nthreads) clauses) { __VA_ARGS__ } }      \
        else { __VA_ARGS__ }                                                                    \
    } while (0)
/* x (M rows of IN values of the instantiation's type T) too large to have stayed in L2 since it was written */
#define SG_BIG_X(M, IN) ((double)(M) * (double)(IN) * sizeof(T) > 262144.0)
/* an MR x NV tile of accumulators fits beside one row of NV weight vectors and a broadcast */
#define SG_FITS(NV, MR) ((MR) * (NV) + (NV) < SG_NREG)
#define SG_NVMAX (SG_NREG >= 32 ? 4 : 2)  /* output vectors per tile of the rows kernels */
/* ... and of the packed kernel's tiles at up to SG_WIDE_ROWS rows, which then read each row of W's
 * blocks in one pass instead of b / (SG_NVMAX VL): 0.74-0.99x the time at 1-2 rows (median 0.87,
 * caches flushed before each call), 0.78-1.0x at 3, GPT-2 and Llama layers, block 32, AVX2, Zen 3 */
#define SG_PNVMAX 4
#define SG_WIDE_ROWS 3
/* Independent sums a tile of MR x NV accumulators keeps along k, so that about 8 FMAs are in flight
 * (two FMA ports, 4 cycles of latency): a small tile (few rows of x) would otherwise wait on each
 * accumulator's previous FMA. */
#define SG_KSETS(NV, MR) ((MR) * (NV) >= 8 ? 1 : (MR) * (NV) >= 4 ? 2 : (MR) * (NV) >= 2 ? 4 : 8)
/* Keeps a loaded vector in a register for all the FMAs of a tile that use it: where registers are
 * free, GCC folds the load into each FMA as a memory operand instead, and a small tile becomes bound
 * by loads (the 4 x 2 SDDMM tile ran at 59% of the FMA peak, 86% with its vectors kept; Zen 3). */
#if defined(__x86_64__)
#define SG_IN_REG(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__)
#define SG_IN_REG(v) __asm__("" : "+w"(v))
#else
#define SG_IN_REG(v) ((void)0)
#endif
int sg_abi_version(void) { return 1; }
int sg_vector_bytes(void) { return SG_VBYTES; }
/* Work buffers that outlive the call: per thread (the caller's, and each OpenMP thread's), one per
 * slot, grown on demand, freed when the thread exits. Allocated and freed on every call, a buffer
 * of 128 KiB or more can be a fresh mapping from glibc each time (whenever its adaptive mmap
 * threshold is low, as in a process holding many models), all of its pages faulted in and zeroed
 * anew. Slots: the caller's copy of x (SG_X), index tables (SG_IDX) and transposed weight blocks
 * (SG_W), an OpenMP thread's tile and table (SG_TILE, SG_TILE2); the caller is also thread 0 of its
 * regions. */
enum { SG_X, SG_IDX, SG_W, SG_TILE, SG_TILE2, SG_SLOTS };
typedef struct { void *p[SG_SLOTS]; size_t n[SG_SLOTS]; } sg_scratch_t;
static pthread_key_t sg_key;
static pthread_once_t sg_once = PTHREAD_ONCE_INIT;
static void sg_scratch_free(void *v) {
    sg_scratch_t *s = (sg_scratch_t *)v;
    for (int i = 0; i < SG_SLOTS; i++) free(s->p[i]);
    free(s);
}
static void sg_key_make(void) { pthread_key_create(&sg_key, sg_scratch_free); }
/* elements per channel of a stride-1 kernel's padded image, rows S apart (pad_images) */
static inline int64_t sg_pad_plane(int64_t H, int64_t PH, int64_t PW, int64_t S) { return (H + 2 * PH) * S + 2 * PW; }
static void *sg_scratch(int slot, size_t bytes) {  /* 64-byte aligned; NULL if out of memory */
    pthread_once(&sg_once, sg_key_make);
    sg_scratch_t *s = (sg_scratch_t *)pthread_getspecific(sg_key);
    if (s == NULL) {
        if ((s = (sg_scratch_t *)calloc(1, sizeof *s)) == NULL) return NULL;
        if (pthread_setspecific(sg_key, s)) { free(s); return NULL; }
    }
    bytes = bytes / 64 * 64 + 64;  /* whole cache lines, at least one */
    if (bytes > s->n[slot]) {
        free(s->p[slot]);
        s->p[slot] = aligned_alloc(64, bytes);
        s->n[slot] = s->p[slot] ? bytes : 0;
    }
    return s->p[slot];
}
/* one fixed weight's arguments of sg_rows_packed (W's blocks stored (in, out), x and y dense), so that a
 * product of it passes four values (cpu.Prepared: at one row the call's cost is the product's) */
typedef struct { int64_t in, out, b; const void *wp, *crow, *col, *bias; } sg_plan_t;
/* the most blocks in any block-row: the size of a per-block-row packing buffer */
static int64_t sg_max_row_blocks(const int32_t *crow, int64_t R) {
    int64_t m = 0;
    for (int64_t r = 0; r < R; r++) m = crow[r + 1] - crow[r] > m ? crow[r + 1] - crow[r] : m;
    return m;
}
/* fp32 FMA throughput probe: `iters` rounds of 12 independent vector FMA chains per thread (enough
 * to hide the FMA latency on every x86 and Arm core); 12 x 2 x SG_VBYTES / 4 FLOP per round and thread. */
float sg_fma_peak(int64_t iters, int nthreads) {
    typedef float PV __attribute__((vector_size(SG_VBYTES)));
    float out = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : out)
    {
        PV a[12], m = (PV){0} + 0.999f, c = (PV){0} + 1e-3f;
        for (int i = 0; i < 12; i++) a[i] = (PV){0} + (float)i;
        for (int64_t n = 0; n < iters; n++) {
            _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) a[i] = a[i] * m + c;
        }
        for (int i = 0; i < 12; i++) out += a[i][0];
    }
    return out;
}
"""

BODY = r"""
/* ---- one instantiation: T (element type), SUF (name suffix), VL (lanes per vector) ---- */
typedef T FN(vec) __attribute__((vector_size(SG_VBYTES)));
typedef IT FN(ivec) __attribute__((vector_size(SG_VBYTES)));
#define V FN(vec)
#define MI FN(ivec)

static inline V FN(ld)(const T *p) { V v; memcpy(&v, p, sizeof(V)); return v; }
static inline void FN(st)(T *p, V v) { memcpy(p, &v, sizeof(V)); }
static inline V FN(ld_part)(const T *p, int64_t n) { V v = (V){0}; memcpy(&v, p, sizeof(T) * (size_t)n); return v; }
static inline T FN(hsum)(V v) { T s = 0; for (int i = 0; i < VL; i++) s += v[i]; return s; }
/* y[i][:olim] = acc[i][:] + bias[:olim] for the mr real rows of an MR x NV register tile. acc is indexed
 * by unrolled constants only, so that the tile stays in registers (a loop to mr kept it in memory:
 * 5-13% of a short tile of the packed kernel, two blocks of 32 per block-row, Zen 3). */
#define SG_STORE_TILE(acc, MR, NV, mr, olim, bias, y, ldy)                                                  \
    do {                                                                                                    \
        V bv_[NV];  /* the bias, zero past olim */                                                          \
        _Pragma("GCC unroll 4") for (int v = 0; v < (NV); v++) {                                            \
            bv_[v] = (V){0};                                                                                \
            if ((bias) && (olim) - v * VL >= VL) bv_[v] = FN(ld)((bias) + v * VL);                          \
            else if ((bias) && (olim) - v * VL > 0) bv_[v] = FN(ld_part)((bias) + v * VL, (olim) - v * VL); \
        }                                                                                                   \
        _Pragma("GCC unroll 16") for (int i = 0; i < (MR); i++) {                                           \
            if (i >= (mr)) break;                                                                           \
            _Pragma("GCC unroll 4") for (int v = 0; v < (NV); v++) {                                        \
                const int64_t left_ = (olim) - v * VL;                                                      \
                const V out_ = (acc)[i][v] + bv_[v];                                                        \
                if (left_ >= VL) FN(st)((y) + i * (ldy) + v * VL, out_);                                    \
                else for (int64_t l = 0; l < left_; l++) (y)[i * (ldy) + v * VL + l] = out_[l];             \
            }                                                                                               \
        }                                                                                                   \
    } while (0)

/* ------------------------------------------------------------------------------------------
 * rows kernel: y (M, OUT) = x (M, IN) @ B + bias, B block-sparse with output block-rows r,
 * blocks j in crow[r]..crow[r+1], input block col[j], values at vals + (perm ? perm[j] : j)*b*b.
 * trans = 1: a block is stored (out, in) (W of a linear layer); trans = 0: stored (in, out).
 * Every block-row's blocks are packed once into a thread-local (in, out) buffer with bp lanes
 * (b rounded up to whole vectors), then an MR x NV register tile of y is accumulated over them.
 * ---------------------------------------------------------------------------------------- */
#define MK_ROWS(NV, MR)                                                                          \
_Static_assert(SG_FITS(NV, MR), "register tile too large");                                     \
static void FN(mk_rows_##NV##_##MR)(int64_t mr, int64_t nz, const T *x, int64_t ldx,            \
        const T *buf, int64_t b, int64_t bp, int64_t lane0, const int64_t *in0, const int64_t *kb,\
        T *y, int64_t ldy, int64_t olim, const T *bias) {                                       \
    V acc[MR][NV];                                                                               \
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++)                                        \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] = (V){0};                 \
    const T *xr[MR];                                                                             \
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) xr[i] = x + (i < mr ? i : mr - 1) * ldx; \
    for (int64_t jj = 0; jj < nz; jj++) {                                                        \
        const T *bj = buf + jj * b * bp + lane0;                                                 \
        const int64_t c = in0[jj], kn = kb[jj];                                                  \
        for (int64_t kk = 0; kk < kn; kk++) {                                                    \
            V w[NV];                                                                             \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                               \
                w[v] = FN(ld)(bj + kk * bp + v * VL); SG_IN_REG(w[v]);                           \
            }                                                                                    \
            _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) {                              \
                const T a = xr[i][c + kk];                                                       \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] += w[v] * a;      \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    SG_STORE_TILE(acc, MR, NV, mr, olim, bias ? bias + lane0 : NULL, y + lane0, ldy);            \
}
/* tiles by NV (1..SG_NVMAX): the tallest that fits */
#if SG_NREG >= 32
#define ROWS_TILES(X) X(1, 16) X(2, 12) X(3, 8) X(4, 6)
#else
#define ROWS_TILES(X) X(1, 12) X(2, 6)
#endif
ROWS_TILES(MK_ROWS)
typedef void (*FN(mk_rows_fn))(int64_t, int64_t, const T *, int64_t, const T *, int64_t, int64_t, int64_t,
                               const int64_t *, const int64_t *, T *, int64_t, int64_t, const T *);
#define ROWS_ENTRY(NV, MR) {MR, FN(mk_rows_##NV##_##MR)},
static const struct { int64_t mr; FN(mk_rows_fn) f; } FN(rows_tiles)[SG_NVMAX] = {ROWS_TILES(ROWS_ENTRY)};
#undef ROWS_ENTRY
#undef ROWS_TILES

int FN(sg_rows)(int64_t M, int64_t IN, int64_t OUT, int64_t b, const T *x, int64_t ldx,
                 const T *vals, const int32_t *crow, const int32_t *col, const int32_t *perm, int trans,
                 const T *bias, T *y, int64_t ldy, int nthreads) {
    const int64_t R = (OUT + b - 1) / b, bp = (b + VL - 1) / VL * VL;
    const int64_t maxnz = sg_max_row_blocks(crow, R);
    const double work = (double)M * (double)crow[R] * (double)(b * b);
    const int64_t chunk = CHUNK(R, nthreads);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (work > 32768.0) reduction(| : failed)
    {
        T *buf = (T *)sg_scratch(SG_TILE, (size_t)(maxnz * b * bp) * sizeof(T));
        int64_t *in0 = (int64_t *)sg_scratch(SG_TILE2, sizeof(int64_t) * 2 * maxnz), *kb = in0 ? in0 + maxnz : NULL;
        failed = buf == NULL || in0 == NULL;
#pragma omp for schedule(dynamic, chunk)
        for (int64_t r = 0; r < R; r++) {
            if (failed) continue;
            const int64_t o0 = r * b, ob = OUT - o0 < b ? OUT - o0 : b, nz = crow[r + 1] - crow[r];
            for (int64_t jj = 0; jj < nz; jj++) {
                const int64_t j = crow[r] + jj, idx = perm ? perm[j] : j;
                const T *src = vals + idx * b * b;
                T *dst = buf + jj * b * bp;
                in0[jj] = (int64_t)col[j] * b;
                kb[jj] = IN - in0[jj] < b ? IN - in0[jj] : b;
                for (int64_t i = 0; i < b; i++) {
                    T *d = dst + i * bp;
                    if (trans) for (int64_t o = 0; o < b; o++) d[o] = src[o * b + i];
                    else memcpy(d, src + i * b, sizeof(T) * b);
                    for (int64_t o = b; o < bp; o++) d[o] = 0;
                }
            }
            for (int64_t lane0 = 0; lane0 < bp; lane0 += SG_NVMAX * VL) {
                const int64_t lanes = bp - lane0 < SG_NVMAX * VL ? bp - lane0 : SG_NVMAX * VL, nv = lanes / VL;
                const int64_t olim = ob - lane0;
                if (olim <= 0) break;
                const T *bb = bias ? bias + o0 : NULL;
                T *yb = y + o0;
                if (nz == 0) {  /* empty block-row: bias or zeros */
                    for (int64_t m = 0; m < M; m++)
                        for (int64_t o = 0; o < (olim < lanes ? olim : lanes); o++)
                            yb[m * ldy + lane0 + o] = bb ? bb[lane0 + o] : 0;
                    continue;
                }
                const int64_t MR = FN(rows_tiles)[nv - 1].mr, ol = olim < lanes ? olim : lanes;
                for (int64_t m0 = 0; m0 < M; m0 += MR)
                    FN(rows_tiles)[nv - 1].f(M - m0 < MR ? M - m0 : MR, nz, x + m0 * ldx, ldx, buf, b, bp, lane0,
                                            in0, kb, yb + m0 * ldy, ldy, ol, bb);
            }
        }
    }
    return failed;
}

/* ------------------------------------------------------------------------------------------
 * packed rows kernel (b % VL == 0): y (M, OUT) = x (M, IN) @ B + bias with B's blocks stored
 * (in, out): element (i, o) of block j at wp + idx*b*b + i*b + o, idx = perm ? perm[j] : j. W^T of a
 * linear layer's values reads them in place through perm (dX). W itself (trans = 1, no perm) is
 * stored (out, in) and transposed here: with one chunk of rows, each block-row's blocks into the
 * thread's L1/L2 panel as the row is taken (W is read once, as from a transposed copy, and nothing
 * is written back to memory); with several, into one copy up front, shared (SG_W). An MR x NV
 * register tile of y (MR rows of x, NV vectors of outputs) runs over all blocks of its block-row,
 * broadcasting x and loading W's rows. Threads split the block-rows of one chunk of tiles at a
 * time: the chunk stays in L2 while every block-row's W panel passes over it, each panel reused by
 * all the chunk's tiles.
 * ---------------------------------------------------------------------------------------- */
/* dst <- src^T for one VL x VL tile (row strides ldd, lds), in registers: log2(VL) perfect shuffles
 * (rows 2q, 2q + 1 <- the interleaved halves of rows q and q + VL/2), each rotating the (row, column)
 * index bits left by one: after log2(VL) of them the row and column bits have swapped places.
 * transpose_block: dst (in, out) <- src (out, in), one b x b block (b a multiple of VL). */
static inline void FN(transpose_tile)(T *dst, int64_t ldd, const T *src, int64_t lds) {
    MI lo, hi;
    for (int j = 0; j < VL; j++) { lo[j] = (j % 2 ? VL : 0) + j / 2; hi[j] = lo[j] + VL / 2; }
    V r[VL], t[VL];
    _Pragma("GCC unroll 16") for (int q = 0; q < VL; q++) r[q] = FN(ld)(src + q * lds);
    _Pragma("GCC unroll 4") for (int h = 1; h < VL; h *= 2) {
        _Pragma("GCC unroll 8") for (int q = 0; q < VL / 2; q++) {
            t[2 * q] = __builtin_shuffle(r[q], r[q + VL / 2], lo);
            t[2 * q + 1] = __builtin_shuffle(r[q], r[q + VL / 2], hi);
        }
        _Pragma("GCC unroll 16") for (int q = 0; q < VL; q++) r[q] = t[q];
    }
    _Pragma("GCC unroll 16") for (int q = 0; q < VL; q++) FN(st)(dst + q * ldd, r[q]);
}
static void FN(transpose_block)(T *dst, const T *src, int64_t b) {
    for (int64_t o0 = 0; o0 < b; o0 += VL)
        for (int64_t i0 = 0; i0 < b; i0 += VL) FN(transpose_tile)(dst + i0 * b + o0, b, src + o0 * b + i0, b);
}
static inline void FN(panel_row)(T *dst, const T *src, int64_t left, int64_t b) {  /* b values, zeros past left */
    const int64_t n = left < b ? left : b;
    memcpy(dst, src, sizeof(T) * (size_t)n);
    if (n < b) memset(dst + n, 0, sizeof(T) * (size_t)(b - n));
}

/* the tile, starting from zero (K = p, ADD = 0) or from y (K = pa, ADD = 1: a later slice of x) */
#define MK_PACKED_FN(NV, MR, K, ADD)                                                             \
static void FN(mk_##K##_##NV##_##MR)(int64_t nz, const T *xp, int64_t ldx, int64_t IN,              \
        const T *wp, const int32_t *permr, int64_t b, const int32_t *colr, int64_t cbase, T *y,  \
        int64_t ldy, int64_t mr, int64_t olim, const T *bias) {                                  \
    enum { KS = SG_KSETS(NV, MR) };                                                              \
    V acc[KS][MR][NV];  /* KS partial sums over k = kk mod KS, added up at the end */            \
    _Pragma("GCC unroll 8") for (int s = 0; s < KS; s++)                                         \
        _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++)                                    \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[s][i][v] = (V){0};          \
    if (ADD)  /* a later slice of x's columns: the sum starts from y */                          \
        _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) {                                  \
            if (i >= mr) break;                                                                  \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                               \
                const int64_t left = olim - v * VL;                                              \
                if (left >= VL) acc[0][i][v] = FN(ld)(y + i * ldy + v * VL);                     \
                else if (left > 0) acc[0][i][v] = FN(ld_part)(y + i * ldy + v * VL, left);       \
            }                                                                                    \
        }                                                                                        \
    const T *xr[MR];  /* row i of the tile (the last real row again past mr: read, never stored) */ \
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) xr[i] = xp + (i < mr ? i : mr - 1) * ldx; \
    for (int64_t i = 0; i < mr; i++)  /* y's lines, owned by the time the tile is stored */      \
        for (int v = 0; v < NV; v++) __builtin_prefetch(y + i * ldy + v * VL, 1, 3);             \
    for (int64_t jj = 0; jj < nz; jj++) {                                                        \
        const int64_t c = (int64_t)colr[jj] * b - cbase, kn = IN - c < b ? IN - c : b;           \
        const T *w = wp + (permr ? permr[jj] : jj) * b * b;                                      \
        int64_t kk = 0;                                                                          \
        for (; kk + KS <= kn; kk += KS)                                                          \
            _Pragma("GCC unroll 8") for (int s = 0; s < KS; s++)                                 \
                FN(p_step_##NV##_##MR)(acc[s], w + (kk + s) * b, xr, c + kk + s);                \
        for (; kk < kn; kk++) FN(p_step_##NV##_##MR)(acc[0], w + kk * b, xr, c + kk);            \
    }                                                                                            \
    _Pragma("GCC unroll 8") for (int s = 1; s < KS; s++)                                         \
        _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++)                                    \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[0][i][v] += acc[s][i][v];   \
    SG_STORE_TILE(acc[0], MR, NV, mr, olim, bias, y, ldy);                                       \
}
#define MK_PACKED(NV, MR)                                                                        \
/* one k of the tile: acc[i][:] += x[i][kk] * w's row kk (NV vectors) */                        \
static inline __attribute__((always_inline)) void FN(p_step_##NV##_##MR)(V (*acc)[NV], const T *wk, \
        const T *const *xr, int64_t ck) {                                                        \
    V wv[NV];                                                                                    \
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) { wv[v] = FN(ld)(wk + v * VL); SG_IN_REG(wv[v]); } \
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) {                                      \
        const T a = xr[i][ck];                                                                   \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] += wv[v] * a;             \
    }                                                                                            \
}                                                                                                \
_Static_assert(SG_FITS(NV, MR * SG_KSETS(NV, MR)), "register tile too large");                   \
MK_PACKED_FN(NV, MR, p, 0)                                                                       \
MK_PACKED_FN(NV, MR, pa, 1)
/* every tile that fits (SG_FITS), by NV (1..SG_PNVMAX; NV > SG_NVMAX only for SG_WIDE_ROWS rows) */
#if SG_NREG >= 32
#define PACKED_TILES(X) X(1, 1) X(1, 2) X(1, 4) X(1, 6) X(1, 8) X(1, 12) X(1, 16) X(2, 1) X(2, 2) X(2, 4) \
    X(2, 6) X(2, 8) X(2, 12) X(3, 1) X(3, 2) X(3, 4) X(3, 6) X(3, 8) X(4, 1) X(4, 2) X(4, 4) X(4, 6)
#else
#define PACKED_TILES(X) X(1, 1) X(1, 2) X(1, 4) X(1, 6) X(1, 8) X(1, 12) X(2, 1) X(2, 2) X(2, 4) X(2, 6) \
    X(3, 1) X(3, 2) X(4, 1) X(4, 2)
#endif
PACKED_TILES(MK_PACKED)

typedef void (*FN(mk_p_fn))(int64_t, const T *, int64_t, int64_t, const T *, const int32_t *, int64_t,
                             const int32_t *, int64_t, T *, int64_t, int64_t, int64_t, const T *);
/* register tiles by [from y][NV - 1][index of MR in mr_sizes]; NULL where NV x MR would spill */
static const int FN(mr_sizes)[7] = {1, 2, 4, 6, 8, 12, 16};
#define MR_INDEX(MR) ((MR) <= 2 ? (MR) - 1 : (MR) <= 8 ? (MR) / 2 : (MR) / 4 + 2)
#define PACKED_ENTRY(NV, MR) [NV - 1][MR_INDEX(MR)] = FN(mk_p_##NV##_##MR),
#define PACKED_ADD_ENTRY(NV, MR) [NV - 1][MR_INDEX(MR)] = FN(mk_pa_##NV##_##MR),
static const FN(mk_p_fn) FN(mk_p_table)[2][SG_PNVMAX][7] = {{PACKED_TILES(PACKED_ENTRY)},
                                                           {PACKED_TILES(PACKED_ADD_ENTRY)}};
#undef PACKED_ENTRY
#undef PACKED_ADD_ENTRY
#undef MR_INDEX
#undef PACKED_TILES

/* block columns per slice of x: 8 tiles of rows in 128 KiB, at least 8 blocks per block-row and
 * slice on average; C (no slices) below 32 blocks per block-row or if a row's blocks are not sorted */
static int64_t FN(slice_width)(const int32_t *crow, const int32_t *col, int64_t R, int64_t C, int64_t TM,
                               int64_t b) {
    const int64_t nnzb = crow[R];
    if (nnzb < 32 * R) return C;
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = crow[r]; j + 1 < crow[r + 1]; j++)
            if (col[j] >= col[j + 1]) return C;
    const int64_t fit = 131072 / (8 * TM * b * (int64_t)sizeof(T)), enough = (8 * C * R + nnzb - 1) / nnzb;
    const int64_t cw = fit > enough ? fit : enough;
    return cw < 1 ? 1 : cw < C ? cw : C;
}
/* the smallest tile height >= m that NV vectors of accumulators allow (the largest if none) */
static int FN(mr_index)(int64_t m, int64_t nv) {
    int best = 0;
    for (int i = 0; i < 7 && FN(mk_p_table)[0][nv - 1][i]; i++) { best = i; if (FN(mr_sizes)[i] >= m) break; }
    return best;
}

/* output vectors a register tile spans in a product of M rows with b-wide blocks, and tiles per chunk of x
 * with rows of ld values: about 128 KiB and at least 4 tiles (8 made a chunk of long rows outgrow L2: at
 * 3-4.6k inputs 4 took 0.88-1.0x the time, 1 and 2 threads, Zen 3) */
static int64_t FN(tile_vectors)(int64_t M, int64_t b) {
    const int64_t nvmax = M <= SG_WIDE_ROWS ? SG_PNVMAX : SG_NVMAX;
    return b / VL < nvmax ? b / VL : nvmax;
}
static int64_t FN(chunk_tiles)(int64_t ld, int64_t TM) {
    const double tile_bytes = (double)ld * TM * sizeof(T);
    return 131072 / tile_bytes > 4 ? (int64_t)(131072 / tile_bytes) : 4;
}

/* sg_rows_packed on rows of x by the calling threads together; `part`: one group of rows of a larger x,
 * taken by one thread of the caller's team (x then streams through the copy, and the worksharing loops
 * below run in a team of one, so that they do not bind to the caller's) */
static int FN(rows_packed_team)(int64_t M, int64_t IN, int64_t OUT, int64_t b, const T *x, int64_t ldx, const T *wp,
                                const int32_t *crow, const int32_t *col, const int32_t *perm, int trans, const T *bias,
                                T *y, int64_t ldy, int nthreads, int part) {
    const int64_t R = (OUT + b - 1) / b, Kp = (IN + b - 1) / b * b;
    const int64_t nv0 = FN(tile_vectors)(M, b);
    const int mi = FN(mr_index)(M, nv0), TM = FN(mr_sizes)[mi];
    const int64_t ntile = (M + TM - 1) / TM;
    const int ml = FN(mr_index)(M - (ntile - 1) * TM, nv0);  /* the last tile: the smallest height that fits */
    /* x in chunks (chunk_tiles). A chunk is first copied at a row stride of Kp + one vector (zero-padded
     * past IN) when x's own stride is a multiple of 2 KiB (a tile's rows would share one L1 set) or x is
     * too large to have stayed in L2 since it was written (SG_BIG_X): the copy streams it in, where a
     * tile, reading a few lines of each of its rows per block, would take scattered cache misses at
     * memory latency. */
    const int pack_x = part || (IN * (int64_t)sizeof(T)) % 2048 == 0 || SG_BIG_X(M, IN);
    int64_t ldp = pack_x ? Kp + VL : ldx;
    int64_t per_chunk = FN(chunk_tiles)(pack_x ? ldp : IN, TM);
    /* a chunk of x over 384 KiB (rows too long for 8 tiles in 128 KiB) and many blocks per block-row:
     * x's columns in slices of cw block columns (each in chunks of 8 tiles), every block-row's blocks
     * of one slice at a time, y summed over the slices (4 tiles of a 5.6k-input row already outgrew
     * L2: 0.87-0.99x the time on Llama-sized layers at s = 0.75, 1 and 2 threads, Zen 3). Not for the
     * op's W, transposed on the way. */
    const int64_t C = Kp / b;
    const double chunk_bytes = (double)(per_chunk * TM < M ? per_chunk * TM : M) * ldp * sizeof(T);
    const int64_t cw = trans || !pack_x || per_chunk >= 8 || chunk_bytes <= 393216.0 ? C
                     : FN(slice_width)(crow, col, R, C, TM, b);
    int64_t *cur = NULL;  /* each block-row's first block of the slice */
    if (cw < C) {
        per_chunk = 8;
        ldp = cw * b + VL;
        if ((cur = (int64_t *)sg_scratch(SG_IDX, sizeof(int64_t) * (size_t)R)) == NULL) return 1;
    }
    T *xp = NULL;
    if (pack_x) {
        xp = (T *)sg_scratch(SG_X, (size_t)(per_chunk * TM < M ? per_chunk * TM : M) * ldp * sizeof(T));
        if (xp == NULL) return 1;
    }
    const int row_t = trans && ntile <= per_chunk;  /* transposed per block-row (one chunk) */
    const int64_t maxnz = row_t ? sg_max_row_blocks(crow, R) : 0;
    T *wt = NULL;  /* the shared transposed copy (several chunks) */
    if (trans && !row_t && (wt = (T *)sg_scratch(SG_W, sizeof(T) * (size_t)(crow[R] * b * b))) == NULL) return 1;
    const double work = (double)M * (double)crow[R] * (double)(b * b);
    int failed = 0;
    SG_TEAM(part || (nthreads > 1 && work > 32768.0), reduction(| : failed), {
        T *panel = row_t ? (T *)sg_scratch(SG_TILE, sizeof(T) * (size_t)(maxnz * b * b)) : NULL;
        failed |= row_t && panel == NULL;  /* (the thread still takes part in every worksharing loop) */
        if (wt) {
            _Pragma("omp for schedule(static)")
            for (int64_t j = 0; j < crow[R]; j++) FN(transpose_block)(wt + j * b * b, wp + j * b * b, b);
        }
        for (int64_t t0 = 0; t0 < ntile; t0 += per_chunk) {
            const int64_t t1 = t0 + per_chunk < ntile ? t0 + per_chunk : ntile;
            const int64_t c0 = t0 * TM, c1 = t1 * TM < M ? t1 * TM : M;
            for (int64_t s0 = 0; s0 < C; s0 += cw) {
                const int64_t xoff = s0 * b;
                if (pack_x) {
                    _Pragma("omp for schedule(static)")
                    for (int64_t m = c0; m < c1; m++)
                        FN(panel_row)(xp + (m - c0) * ldp, x + m * ldx + xoff, IN - xoff, ldp);
                }
                _Pragma("omp for schedule(dynamic, 1)")
                for (int64_t r = 0; r < R; r++) {
                    int64_t j0 = crow[r], j1 = crow[r + 1];
                    if (cur) {
                        j0 = s0 == 0 ? crow[r] : cur[r];
                        for (j1 = j0; j1 < crow[r + 1] && col[j1] < s0 + cw; j1++) {}
                        cur[r] = j1;
                        if (s0 > 0 && j1 == j0) continue;
                    }
                    const int64_t o0 = r * b, ob = OUT - o0 < b ? OUT - o0 : b, nz = j1 - j0;
                    const T *wr = (wt ? wt : wp) + (perm ? 0 : j0 * b * b);
                    if (row_t) {
                        if (panel == NULL) continue;
                        for (int64_t jj = 0; jj < nz; jj++) {  /* W streams from L3 or memory: fetch two blocks ahead */
                            if (crow[r] + jj + 2 < crow[R])
                                for (int64_t l = 0; l < b * b; l += 64 / (int64_t)sizeof(T))
                                    __builtin_prefetch(wr + (jj + 2) * b * b + l);
                            FN(transpose_block)(panel + jj * b * b, wr + jj * b * b, b);
                        }
                        wr = panel;
                    }
                    for (int64_t lane0 = 0; lane0 < ob; lane0 += nv0 * VL) {
                        const int64_t nv = (b - lane0) / VL < nv0 ? (b - lane0) / VL : nv0;
                        const int64_t olim = ob - lane0 < nv * VL ? ob - lane0 : nv * VL;
                        for (int64_t t = t0; t < t1; t++) {
                            const int64_t m0 = t * TM, mr = M - m0 < TM ? M - m0 : TM;
                            FN(mk_p_table)[s0 > 0][nv - 1][t == ntile - 1 ? ml : mi](
                                nz, pack_x ? xp + (m0 - c0) * ldp : x + m0 * ldx, ldp, pack_x ? Kp - xoff : IN,
                                wr + lane0, perm ? perm + j0 : NULL, b, col + j0, xoff, y + m0 * ldy + o0 + lane0, ldy,
                                mr, olim, bias && s0 == 0 ? bias + o0 + lane0 : NULL);
                        }
                    }
                }
            }
        }
    });
    return failed;
}

/* Several threads and at least two chunks of x each: every thread takes whole groups of rows (about a chunk;
 * as many groups as the threads divide evenly), copies its own x into its own L2 and runs all block-rows on
 * it, where the team would share each chunk's block-rows and meet at two barriers per chunk. The op's W
 * (trans) is transposed once first, shared. GPT-2 and Llama layers, block 32, 64-1024 rows, 2 threads, AMD
 * EPYC (Zen 3): 0.56-1.01x the time (median 0.92; a prototype 0.51-1.0x, median 0.83, in a noisier run); at
 * s = 0.9 and 1024 rows the shared chunks gave eta 0.39-0.67 from run to run, the groups 0.73-0.78 (dense
 * MKL at 179-187 GFLOP/s). */
int FN(sg_rows_packed)(int64_t M, int64_t IN, int64_t OUT, int64_t b, const T *x, int64_t ldx, const T *wp,
                        const int32_t *crow, const int32_t *col, const int32_t *perm, int trans, const T *bias,
                        T *y, int64_t ldy, int nthreads) {
    if (M <= 0) return 0;
    const int64_t Kp = (IN + b - 1) / b * b, TM = FN(mr_sizes)[FN(mr_index)(M, FN(tile_vectors)(M, b))];
    const int64_t per_group = FN(chunk_tiles)(Kp + VL, TM), ntile = (M + TM - 1) / TM, nnzb = crow[(OUT + b - 1) / b];
    if (nthreads <= 1 || !SG_BIG_X(M, IN) || ntile < 2 * per_group * nthreads)
        return FN(rows_packed_team)(M, IN, OUT, b, x, ldx, wp, crow, col, perm, trans, bias, y, ldy, nthreads, 0);
    const int64_t ng = (ntile + per_group * nthreads - 1) / (per_group * nthreads) * nthreads;
    T *wt = NULL;
    if (trans && (wt = (T *)sg_scratch(SG_W, sizeof(T) * (size_t)(nnzb * b * b))) == NULL) return 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        if (wt) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < nnzb; j++) FN(transpose_block)(wt + j * b * b, wp + j * b * b, b);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < ng; g++) {  /* tiles ntile * g / ng .. ntile * (g + 1) / ng */
            const int64_t m0 = ntile * g / ng * TM, end = ntile * (g + 1) / ng * TM, m1 = end < M ? end : M;
            if (m1 > m0)
                failed |= FN(rows_packed_team)(m1 - m0, IN, OUT, b, x + m0 * ldx, ldx, wt ? wt : wp, crow, col, perm, 0,
                                               bias, y + m0 * ldy, ldy, 1, 1);
        }
    }
    return failed;
}

int FN(sg_rows_plan)(const sg_plan_t *p, int64_t M, const T *x, T *y, int nthreads) {
    return FN(sg_rows_packed)(M, p->in, p->out, p->b, x, p->in, (const T *)p->wp, (const int32_t *)p->crow,
                              (const int32_t *)p->col, NULL, 0, (const T *)p->bias, y, p->out, nthreads);
}

/* ------------------------------------------------------------------------------------------
 * cols kernel: Y (P, OUT, L) = B (OUT, IN) X (P, IN, L) + bias[:, None], B block-sparse with
 * output block-rows r; element (o, i) of a block at vals + idx*b*b + o*so + i*si. Lanes run
 * along L (spatial positions of an im2col view, or the batch of a transposed linear); an
 * OR x LV register tile (OR output rows, LV vectors of lanes) accumulates broadcast weights,
 * starting from zero, or from Y itself when `load` is set (a K chunk after the first; bias NULL).
 * A layer's blocks may not fit in L2 (a widened ResNet stage holds megabytes), and the rows a tile
 * reads follow no stride a prefetcher learns, so the tile prefetches its weight lines: two blocks
 * ahead, and this block's rows of the next OR output rows. L == 1 takes a dot-product path (x is
 * then a (P, IN) matrix: small-batch linear layers).
 * ---------------------------------------------------------------------------------------- */
/* sum of each of VL vectors, as one vector (lane r = sum of acc[r]): pairwise shuffle transpose */
static inline V FN(reduce_rows)(V *acc) {
#if defined(__clang__)
    V out;
    for (int r = 0; r < VL; r++) out[r] = FN(hsum)(acc[r]);
    return out;
#else
    int n = VL;
    for (int h = VL / 2; h >= 1; h /= 2) {
        MI lo, hi;
        for (int j = 0; j < VL; j++) { lo[j] = (j / h) * 2 * h + j % h; hi[j] = lo[j] + h; }
        for (int i = 0; i < n / 2; i++)
            acc[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], lo) + __builtin_shuffle(acc[2 * i], acc[2 * i + 1], hi);
        n /= 2;
    }
    return acc[0];
#endif
}

/* VL consecutive output rows o..o+VL-1 of one block-row (b >= VL, rows contiguous: si == 1) */
static void FN(dot_rows)(T *y, const T *bias, const T *vals, const int32_t *perm, const int32_t *col, int64_t j0,
                         int64_t nz, int64_t b, int64_t so, int64_t o, const T *X, int64_t IN) {
    V acc[VL];
    T tail[VL];
    _Pragma("GCC unroll 16") for (int r = 0; r < VL; r++) { acc[r] = (V){0}; tail[r] = 0; }
    for (int64_t jj = 0; jj < nz; jj++) {
        const int64_t j = j0 + jj, c = (int64_t)col[j] * b, kn = IN - c < b ? IN - c : b;
        const T *w = vals + (int64_t)(perm ? perm[j] : j) * b * b + o * so;
        const T *xx = X + c;
        int64_t i = 0;
        for (; i + VL <= kn; i += VL) {
            V xv = FN(ld)(xx + i);
            SG_IN_REG(xv);
            _Pragma("GCC unroll 16") for (int r = 0; r < VL; r++) acc[r] += FN(ld)(w + r * so + i) * xv;
        }
        for (; i < kn; i++)
            for (int r = 0; r < VL; r++) tail[r] += w[r * so + i] * xx[i];
    }
    V out = FN(reduce_rows)(acc);
    for (int r = 0; r < VL; r++) y[r] = out[r] + tail[r] + (bias ? bias[r] : 0);
}

#define MK_COLS(OR, LV)                                                                          \
_Static_assert(SG_FITS(LV, OR), "register tile too large");                                     \
static void FN(mk_cols_##OR##_##LV)(int64_t orr, const int32_t *col, int64_t j0, int64_t nz,       \
        const int32_t *perm, const T *vals, int64_t b, int64_t so, int64_t si, int64_t ob0,       \
        const T *X, int64_t ldx, const int64_t *roff, int64_t IN, T *Y, int64_t ldy, const T *bias, \
        int load) {                                                                              \
    V acc[OR][LV];                                                                               \
    _Pragma("GCC unroll 8") for (int r = 0; r < OR; r++)                                         \
        _Pragma("GCC unroll 4") for (int v = 0; v < LV; v++)                                     \
            acc[r][v] = load && r < orr ? FN(ld)(Y + r * ldy + v * VL) : (V){0};                 \
    for (int64_t jj = 0; jj < nz; jj++) {                                                        \
        const int64_t c = (int64_t)col[j0 + jj] * b, kn = IN - c < b ? IN - c : b;               \
        const T *blk = vals + (int64_t)(perm ? perm[j0 + jj] : j0 + jj) * b * b;                 \
        const T *wr[OR];                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < OR; r++) wr[r] = blk + (ob0 + (r < orr ? r : orr - 1)) * so; \
        if (jj + 2 < nz) {  /* weight lines two blocks ahead: a layer's blocks may be in L3 */         \
            const T *nb = vals + (int64_t)(perm ? perm[j0 + jj + 2] : j0 + jj + 2) * b * b + ob0 * so;   \
            _Pragma("GCC unroll 8") for (int r = 0; r < OR; r++) __builtin_prefetch(nb + r * so);        \
        }                                                                                        \
        if (si == 1 && ob0 + 2 * OR <= b)  /* and this block's rows for the next tile of output rows */  \
            _Pragma("GCC unroll 8") for (int r = 0; r < OR; r++) __builtin_prefetch(blk + (ob0 + OR + r) * so); \
        for (int64_t i = 0; i < kn; i++) {                                                       \
            V xv[LV];                                                                            \
            const T *xr = roff ? X + roff[c + i] : X + (c + i) * ldx;                            \
            _Pragma("GCC unroll 4") for (int v = 0; v < LV; v++) { xv[v] = FN(ld)(xr + v * VL); SG_IN_REG(xv[v]); } \
            _Pragma("GCC unroll 8") for (int r = 0; r < OR; r++) {                               \
                const T w = wr[r][i * si];                                                       \
                _Pragma("GCC unroll 4") for (int v = 0; v < LV; v++) acc[r][v] += xv[v] * w;     \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    _Pragma("GCC unroll 8") for (int r = 0; r < OR; r++) {  /* acc in registers: SG_STORE_TILE */\
        if (r >= orr) break;                                                                     \
        const T bv = bias ? bias[r] : 0;                                                         \
        _Pragma("GCC unroll 4") for (int v = 0; v < LV; v++) FN(st)(Y + r * ldy + v * VL, acc[r][v] + bv); \
    }                                                                                            \
}
/* OR in {1, 2, 4, 8}, LV in {1, 2, 4}: those that fit, and the most lanes a tile of OR rows takes */
#if SG_NREG >= 32
#define COLS_TILES(X) X(8, 2) X(4, 4) X(2, 4) X(1, 4) X(4, 2) X(2, 2) X(1, 2) X(8, 1) X(4, 1) X(2, 1) X(1, 1)
#else
#define COLS_TILES(X) X(2, 4) X(1, 4) X(4, 2) X(2, 2) X(1, 2) X(8, 1) X(4, 1) X(2, 1) X(1, 1)
#endif
#define COLS_LV(OR) (SG_FITS(4, OR) ? 4 : SG_FITS(2, OR) ? 2 : 1)
COLS_TILES(MK_COLS)
typedef void (*FN(mk_cols_fn))(int64_t, const int32_t *, int64_t, int64_t, const int32_t *, const T *, int64_t,
                                int64_t, int64_t, int64_t, const T *, int64_t, const int64_t *, int64_t, T *, int64_t,
                                const T *, int);
#define COLS_ROW(OR) ((OR) >= 4 ? (OR) / 4 + 1 : (OR) - 1)  /* 1, 2, 4, 8 -> 0..3 (and LV 1, 2, 4 -> LV / 2) */
#define COLS_ENTRY(OR, LV) [COLS_ROW(OR)][LV / 2] = FN(mk_cols_##OR##_##LV),
static const FN(mk_cols_fn) FN(cols_table)[4][3] = {COLS_TILES(COLS_ENTRY)};
#undef COLS_ENTRY
#undef COLS_TILES

static void FN(cols_tile)(int64_t OR, int64_t LV, int64_t orr, const int32_t *col, int64_t j0,
                          int64_t nz, const int32_t *perm, const T *vals, int64_t b, int64_t so, int64_t si,
                          int64_t ob0, const T *X, int64_t ldx, const int64_t *roff, int64_t IN, T *Y, int64_t ldy,
                          const T *bias, int load) {
    FN(cols_table)[COLS_ROW(OR)][LV / 2](orr, col, j0, nz, perm, vals, b, so, si, ob0, X, ldx, roff, IN, Y, ldy, bias,
                                         load);
}

int FN(sg_cols)(int64_t P, int64_t IN, int64_t OUT, int64_t L, int64_t b, const T *X, const T *vals,
                 const int32_t *crow, const int32_t *col, const int32_t *perm, int64_t so, int64_t si,
                 const T *bias, T *Y, int nthreads) {
    const int64_t R = (OUT + b - 1) / b;
    const int64_t OR = b >= 8 ? 8 : b >= 4 ? 4 : b >= 2 ? 2 : 1;
    const double work = (double)P * (double)L * (double)crow[R] * (double)(b * b);
    /* lanes in blocks of LB, so the rows of X a lane block reads stay in cache across block-rows */
    int64_t LB = (32768 / (IN > 0 ? IN : 1) + 63) / 64 * 64;  /* about 128 KiB of X rows per lane block */
    LB = LB < 64 ? 64 : LB > 256 ? 256 : LB;
    if (L <= LB) LB = L;
    const int64_t NLB = (L + LB - 1) / LB;
    const int64_t chunk = CHUNK(P * NLB * R, nthreads);
    SG_TEAM(nthreads > 1 && work > 32768.0, , _Pragma("omp for collapse(3) schedule(dynamic, chunk)")
    for (int64_t p = 0; p < P; p++) {
      for (int64_t lb = 0; lb < NLB; lb++) {
        for (int64_t r = 0; r < R; r++) {
            const int64_t lbeg = lb * LB, lend = lbeg + LB < L ? lbeg + LB : L;
            const T *Xp = X + p * IN * L;
            T *Yp = Y + p * OUT * L;
            const int64_t o0 = r * b, ob = OUT - o0 < b ? OUT - o0 : b;
            const int64_t j0 = crow[r], nz = crow[r + 1] - j0;
            if (L == 1 && b == 1) {  /* CSR dot product: y[o] = sum_j v_j x[col_j] */
                T s = 0;
                if (perm) for (int64_t j = j0; j < j0 + nz; j++) s += vals[perm[j]] * Xp[col[j]];
                else {
                    _Pragma("omp simd reduction(+ : s)")
                    for (int64_t j = j0; j < j0 + nz; j++) s += vals[j] * Xp[col[j]];
                }
                Yp[o0] = s + (bias ? bias[o0] : 0);
                continue;
            }
            if (L == 1) {  /* dot products: y[o] = sum_j sum_i B(o, i) x[c + i] */
                int64_t o = 0;
                if (si == 1 && b >= VL)  /* VL rows at a time, reduced together by a shuffle transpose */
                    for (; o + VL <= ob; o += VL) FN(dot_rows)(Yp + o0 + o, bias ? bias + o0 + o : NULL, vals, perm,
                                                              col, j0, nz, b, so, o, Xp, IN);
                for (; o < ob; o++) {
                    V acc = (V){0};
                    T s = 0;
                    for (int64_t jj = 0; jj < nz; jj++) {
                        const int64_t j = j0 + jj, c = (int64_t)col[j] * b, kn = IN - c < b ? IN - c : b;
                        const T *w = vals + (int64_t)(perm ? perm[j] : j) * b * b + o * so;
                        const T *xx = Xp + c;
                        int64_t i = 0;
                        if (si == 1) for (; i + VL <= kn; i += VL) acc += FN(ld)(w + i) * FN(ld)(xx + i);
                        for (; i < kn; i++) s += w[i * si] * xx[i];
                    }
                    Yp[o0 + o] = s + FN(hsum)(acc) + (bias ? bias[o0 + o] : 0);
                }
                continue;
            }
            for (int64_t ob0 = 0; ob0 < ob; ob0 += OR) {
                const int64_t orr = ob - ob0 < OR ? ob - ob0 : OR;
                const T *bb = bias ? bias + o0 + ob0 : NULL;
                T *Yr = Yp + (o0 + ob0) * L;
                int64_t l0 = lbeg;
                /* the widest tiles, then narrower ones for the rest (each tile reads every nonzero): with one
                 * vector's tiles after the widest, CSR at s = 0.9 took 1.5-1.8x the time at 16 and 1.3-1.4x
                 * at 24 rows (GPT-2, Llama and ResNet im2col shapes, AVX2, Zen 3), more than at 40 */
                for (int64_t LV = COLS_LV(OR); LV >= 1; LV /= 2)
                    for (; l0 + LV * VL <= lend; l0 += LV * VL)
                        FN(cols_tile)(OR, LV, orr, col, j0, nz, perm, vals, b, so, si, ob0, Xp + l0, L, NULL, IN,
                                      Yr + l0, L, bb, 0);
                if (l0 < lend) {  /* lane tail (fewer than VL lanes left) */
                    const int64_t tl = lend - l0;
                    for (int64_t o = 0; o < orr; o++) {
                        T acc[VL];
                        for (int64_t l = 0; l < VL; l++) acc[l] = bb ? bb[o] : 0;
                        for (int64_t jj = 0; jj < nz; jj++) {
                            const int64_t j = j0 + jj, c = (int64_t)col[j] * b, kn = IN - c < b ? IN - c : b;
                            const T *w = vals + (int64_t)(perm ? perm[j] : j) * b * b + (ob0 + o) * so;
                            for (int64_t i = 0; i < kn; i++) {
                                const T wi = w[i * si], *xr = Xp + (c + i) * L + l0;
                                for (int64_t l = 0; l < tl; l++) acc[l] += wi * xr[l];
                            }
                        }
                        for (int64_t l = 0; l < tl; l++) Yr[o * L + l0 + l] = acc[l];
                    }
                }
            }
        }
      }
    });
    return 0;
}

/* the im2col rows of output positions l0 .. l0+lt of one image: buf[k][t], k = (c, i, j) in
 * (c, kh, kw) order, row stride ldb; lanes lt .. ldb-1 are zero. Runs of positions along one
 * output row are copied as contiguous input segments when the stride is 1. */
static void FN(im2col_tile)(T *buf, int64_t ldb, const T *xp, int64_t C, int64_t H, int64_t W, int64_t KH,
                            int64_t KW, int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW,
                            int64_t Wo, int64_t l0, int64_t lt) {
    const int64_t K = C * KH * KW;
    for (int64_t q = l0; q < l0 + lt;) {
        const int64_t ho = q / Wo, wo0 = q % Wo;
        const int64_t n = Wo - wo0 < l0 + lt - q ? Wo - wo0 : l0 + lt - q, ofs = q - l0;
        for (int64_t c = 0; c < C; c++)
            for (int64_t i = 0; i < KH; i++) {
                const int64_t hi = ho * SH - PH + i * DH;
                const int inside = hi >= 0 && hi < H;
                const T *src = xp + (c * H + (inside ? hi : 0)) * W;
                for (int64_t j = 0; j < KW; j++) {
                    T *row = buf + ((c * KH + i) * KW + j) * ldb + ofs;
                    const int64_t wb = wo0 * SW - PW + j * DW;
                    if (!inside) { memset(row, 0, sizeof(T) * n); continue; }
                    if (SW == 1) {
                        int64_t t0 = wb < 0 ? -wb : 0, t1 = W - wb < n ? W - wb : n;
                        if (t0 > n) t0 = n;
                        if (t1 < t0) t1 = t0;
                        if (t0) memset(row, 0, sizeof(T) * t0);
                        if (t1 > t0) memcpy(row + t0, src + wb + t0, sizeof(T) * (t1 - t0));
                        if (n > t1) memset(row + t1, 0, sizeof(T) * (n - t1));
                    } else {
                        for (int64_t t = 0; t < n; t++) {
                            const int64_t wi = wb + t * SW;
                            row[t] = wi >= 0 && wi < W ? src[wi] : 0;
                        }
                    }
                }
            }
        q += n;
    }
    if (lt < ldb)
        for (int64_t k = 0; k < K; k++) memset(buf + k * ldb + lt, 0, sizeof(T) * (ldb - lt));
}

/* The padded images of the stride-1 kernels: rows S = max(W + PW, Wo) apart, the zeros between two
 * rows serving as the right padding of one and the left padding of the next (S = W + 1 for a 3 x 3,
 * padding-1 convolution, where Hp x (W + 2 PW) would give W + 2): element (hp, w) of a plane, hp a
 * padded row and -PW <= w < W + PW, at PW + hp S + w. The im2col row (c, i, j) over the "extended"
 * positions e = ho S + wo is then the contiguous run from roff[(c, i, j)] = c plane + i DH S + j DW;
 * positions with wo >= Wo are computed and dropped ((S - Wo) / S of the work). Small images are
 * interleaved G at a time: lane e G + g is position e of image g of a group, every offset times G.
 * xp[p][c][pos][g] <- x, for NG groups; the lanes of a last, short group's missing images are zero
 * (stale values, NaN or subnormal, would slow that arithmetic down). */
static void FN(pad_images)(T *xp, int64_t *roff, const T *x, int64_t N, int64_t C, int64_t H, int64_t W,
                           int64_t KH, int64_t KW, int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t S,
                           int64_t G, int64_t NG, int nthreads) {
    const int64_t plane = sg_pad_plane(H, PH, PW, S), d0 = PW + PH * S, d1 = d0 + (H - 1) * S + W;
    for (int64_t c = 0; c < C; c++)
        for (int64_t i = 0; i < KH; i++)
            for (int64_t j = 0; j < KW; j++) roff[(c * KH + i) * KW + j] = (c * plane + i * DH * S + j * DW) * G;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t pc = 0; pc < NG * C; pc++) {
        const int64_t p = pc / C, c = pc % C;
        T *dst = xp + pc * plane * G;
        memset(dst, 0, sizeof(T) * d0 * G);  /* zero the padding only: before the first row, after the last */
        memset(dst + d1 * G, 0, sizeof(T) * (plane - d1) * G);
        if (p * G + G > N) memset(dst + d0 * G, 0, sizeof(T) * (d1 - d0) * G);
        else for (int64_t h = 0; h + 1 < H; h++) memset(dst + (d0 + h * S + W) * G, 0, sizeof(T) * (S - W) * G);
        for (int64_t g = 0; g < G && p * G + g < N; g++) {
            const T *src = x + ((p * G + g) * C + c) * H * W;
            for (int64_t h = 0; h < H; h++) {
                T *d = dst + (d0 + h * S) * G + g;
                if (G == 1) memcpy(d, src + h * W, sizeof(T) * W);
                else for (int64_t w = 0; w < W; w++) d[w * G] = src[h * W + w];
            }
        }
    }
}

/* y's rows o0..o1 of image group p <- lanes l0..l0 + lt of a tile (row o at tile + (o - o0) ldt),
 * keeping the columns wo < Wo of real images */
static void FN(store_lanes)(T *y, const T *tile, int64_t ldt, int64_t o0, int64_t o1, int64_t p, int64_t G, int64_t N,
                           int64_t OUT, int64_t L, int64_t S, int64_t Wo, int64_t l0, int64_t lt) {
    for (int64_t o = o0; o < o1; o++) {
        const T *src = tile + (o - o0) * ldt;
        if (G == 1) {
            T *Y = y + (p * OUT + o) * L;
            for (int64_t e = l0; e < l0 + lt;) {
                const int64_t ho = e / S, wo = e % S;
                const int64_t run = S - wo < l0 + lt - e ? S - wo : l0 + lt - e;
                if (wo < Wo) memcpy(Y + ho * Wo + wo, src + (e - l0), sizeof(T) * (Wo - wo < run ? Wo - wo : run));
                e += run;
            }
            continue;
        }
        int64_t e = l0 / G, g0 = l0 % G, l = 0;
        for (int64_t ho = e / S, wo = e % S; l < lt; e++, g0 = 0, wo = wo + 1 == S ? 0 : wo + 1, ho += wo == 0) {
            const int64_t gn = G - g0 < lt - l ? G - g0 : lt - l;
            if (wo < Wo) {
                T *Y = y + ((p * G + g0) * OUT + o) * L + ho * Wo + wo;
                for (int64_t g = 0; g < gn && p * G + g0 + g < N; g++) Y[g * OUT * L] = src[l + g];
            }
            l += gn;
        }
    }
}

/* stride-1 convolution without im2col, b not a multiple of VL: the cols register tiles (positions
 * along the vector) read the padded images (pad_images; small ones interleaved so that a register
 * tile stays full) through the table of row offsets. A work item is ltw <= CL lanes of one group and
 * a group of block-rows; it runs over K in chunks whose x stays in L2 (the rows (c, i, j) of one
 * channel c overlap: they span ltw lanes plus the kernel's reach), accumulating in a tile of y, so
 * the weights are read once per ltw lanes and x once per item. Within a block-row, JB blocks at a
 * time run for all b output rows, so their rows of x are read from L1 (1.0-1.1x as fast as each tile
 * of output rows running over all of the row's blocks, on Sparse Wide ResNet-18's layers). */
#define CL (8 * VL)
#define JB 4
#define CONV_XBYTES (192 * 1024)
static int FN(conv2d_shifted)(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OUT, int64_t KH, int64_t KW,
                              int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t S, int64_t b, const T *x,
                              const T *vals, const int32_t *crow, const int32_t *col, const T *bias, T *y,
                              int nthreads) {
    const int64_t Ho = H + 2 * PH - DH * (KH - 1), Wo = W + 2 * PW - DW * (KW - 1);
    const int64_t L = Ho * Wo, Le = (Ho - 1) * S + Wo, K = C * KH * KW, R = (OUT + b - 1) / b;
    const int64_t plane = sg_pad_plane(H, PH, PW, S);
    int64_t G = Le >= 2 * CL ? 1 : ((2 * CL + Le - 1) / Le < N ? (2 * CL + Le - 1) / Le : N);
    const int64_t NG = (N + G - 1) / G;
    G = (N + NG - 1) / NG;  /* groups of equal size */
    const int64_t lanes = Le * G, nlb = (lanes + CL - 1) / CL, ltw = ((lanes + nlb - 1) / nlb + VL - 1) / VL * VL;
    const int64_t span = ltw + ((KH - 1) * DH * S + (KW - 1) * DW) * G;  /* lanes of one channel an item reads */
    const int64_t KC0 = CONV_XBYTES / (int64_t)(span * sizeof(T)) * KH * KW / b * b;  /* K chunk: its x in L2 */
    const int64_t KC = KC0 < b ? b : KC0, nch = K > KC ? (K + KC - 1) / KC : 1;
    const int64_t OR = b >= 4 ? 4 : b >= 2 ? 2 : 1, LV = COLS_LV(OR);
    const int64_t RG = NG * nlb >= 4 * nthreads ? 1 : (R < 4 * nthreads ? R : 4 * nthreads);
    const int64_t per = (R + RG - 1) / RG;
    T *xp = (T *)sg_scratch(SG_X, sizeof(T) * (size_t)(NG * C * plane * G + ltw));
    int64_t *roff = (int64_t *)sg_scratch(SG_IDX, sizeof(int64_t) * (size_t)(K + R * (nch + 1)));
    if (xp == NULL || roff == NULL) return 1;
    int64_t *cs = roff + K;  /* cs[r (nch+1) + q]: first block of row r in chunk q (a partition of the
                                row's blocks, whatever their order; sorted columns make it exact) */
    for (int64_t r = 0; r < R; r++) {
        int64_t j = crow[r];
        cs[r * (nch + 1)] = j;
        for (int64_t q = 1; q < nch; q++) {
            while (j < crow[r + 1] && (int64_t)col[j] * b < q * KC) j++;
            cs[r * (nch + 1) + q] = j;
        }
        cs[r * (nch + 1) + nch] = crow[r + 1];
    }
    memset(xp + NG * C * plane * G, 0, sizeof(T) * ltw);
    FN(pad_images)(xp, roff, x, N, C, H, W, KH, KW, PH, PW, DH, DW, S, G, NG, nthreads);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        T *ytile = (T *)sg_scratch(SG_TILE, (size_t)(per * b * ltw) * sizeof(T));
        failed = ytile == NULL;
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t p = 0; p < NG; p++)
            for (int64_t t = 0; t < nlb; t++)
                for (int64_t g = 0; g < RG; g++) {
                    if (failed) continue;
                    const int64_t l0 = t * ltw, r0 = g * per, r1 = (g + 1) * per < R ? (g + 1) * per : R;
                    const T *X = xp + p * C * plane * G + l0;
                    for (int64_t q = 0; q < nch; q++)
                        for (int64_t r = r0; r < r1; r++) {
                            const int64_t o0 = r * b, ob = OUT - o0 < b ? OUT - o0 : b;
                            const int64_t j0 = cs[r * (nch + 1) + q], nz = cs[r * (nch + 1) + q + 1] - j0;
                            if (q > 0 && nz == 0) continue;
                            for (int64_t jb = 0; jb < nz || jb == 0; jb += JB) {  /* JB blocks for all b rows */
                                const int64_t nzb = nz - jb < JB ? nz - jb : JB, ld = q > 0 || jb > 0;
                                const int last = q == 0 && jb + JB >= nz;  /* the bias joins the last call */
                                for (int64_t ob0 = 0; ob0 < ob; ob0 += OR) {
                                    const int64_t orr = ob - ob0 < OR ? ob - ob0 : OR;
                                    T *Yt = ytile + ((r - r0) * b + ob0) * ltw;
                                    const T *bb = last && bias ? bias + o0 + ob0 : NULL;
                                    int64_t c0 = 0;
                                    for (; c0 + LV * VL <= ltw; c0 += LV * VL)
                                        FN(cols_tile)(OR, LV, orr, col, j0 + jb, nzb, NULL, vals, b, b, 1, ob0,
                                                      X + c0, 0, roff, K, Yt + c0, ltw, bb, ld);
                                    for (; c0 + 2 * VL <= ltw; c0 += 2 * VL)
                                        FN(cols_tile)(OR, 2, orr, col, j0 + jb, nzb, NULL, vals, b, b, 1, ob0,
                                                      X + c0, 0, roff, K, Yt + c0, ltw, bb, ld);
                                    for (; c0 < ltw; c0 += VL)
                                        FN(cols_tile)(OR, 1, orr, col, j0 + jb, nzb, NULL, vals, b, b, 1, ob0,
                                                      X + c0, 0, roff, K, Yt + c0, ltw, bb, ld);
                                }
                            }
                        }
                    const int64_t o1 = r1 * b < OUT ? r1 * b : OUT, lt = lanes - l0 < ltw ? lanes - l0 : ltw;
                    FN(store_lanes)(y, ytile, ltw, r0 * b, o1, p, G, N, OUT, L, S, Wo, l0, lt);
                }
    }
    return failed;
}
#undef CONV_XBYTES
#undef CL
#undef JB

/* stride-1 convolution for b a multiple of BC_NW vectors, output channels along the vector: on the
 * padded images of pad_images and their extended lanes, a register tile holds P lanes x BC_NW
 * vectors of output channels of one block-row and runs over all of the row's blocks, acc[t][u] +=
 * x[roff[k] + l + t] * W^T[k, VL channels u]: one 4-byte broadcast per BC_NW FMAs, where positions
 * along the vector load a shifted vector per tap, split across two cache lines at most taps (the
 * stride-1 3 x 3 layers of a Sparse Wide ResNet-18, block 16, one thread: 1.2-1.5x as fast at
 * s = 0.75, 1.3-1.7x at s = 0.9), and the sum stays in registers over all of K. The tile goes to a
 * (outputs, lanes) tile of y by register transposes (scattered to y's rows directly, 4 KiB apart at
 * 32 x 32, that layer ran 1.6x slower). W's blocks are transposed to (in, out) once per call (SG_W).
 * A work item is ltw lanes of one group (their x, all channels, sized to stay in L2) and a group of
 * block-rows whose weights stay in L2 as all items pass (on the 4 x 4 stage, 9 MB of weights would
 * otherwise stream from memory once per item). Within an item, a block-row's blocks run in groups of
 * at most BC_JG, each group over every tile, the tiles' sums kept between groups in a (lanes, outputs)
 * buffer: a group's rows of W and lines of x (about 16 KiB for 16 lanes) stay in L1 from tile to tile,
 * where a tile running over the whole row read it all from L2 (36 KiB of W alone at C = 128, block 16).
 * Sparse Wide ResNet-18's 3 x 3 layers, blocks 16 and 32, s = 0.75 and 0.9, batch 32, Zen 3: 0.73-0.99x
 * the time at one thread (median 0.83-0.88), 0.78-0.96x at two; with AVX2, 24 tiles per item instead of
 * 16 took another 0.95-1.0x. Images per group, lanes per item and P (from MK_BC's sizes) are chosen for
 * the fewest lanes computed. At stride 2 (phases of the padded image, every
 * tap a shift of one of them) it ran 0.92-1.16x the time of the im2col tiles, so other strides keep
 * those. */
#define MK_BC(P)                                                                                  \
_Static_assert(SG_FITS(BC_NW, P), "register tile too large");                                    \
static void FN(mk_bc_##P)(int64_t nz, const int32_t *colr, const T *wt, int64_t b, int64_t K,      \
                          const T *X, const int64_t *roff, T *ab, int64_t lda, int add) {          \
    V acc[P][BC_NW];                                                                              \
    _Pragma("GCC unroll 32") for (int t = 0; t < P; t++)                                          \
        _Pragma("GCC unroll 2") for (int u = 0; u < BC_NW; u++)                                   \
            acc[t][u] = add ? FN(ld)(ab + (u * lda + t) * VL) : (V){0};                           \
    for (int64_t jj = 0; jj < nz; jj++) {                                                         \
        const int64_t c = (int64_t)colr[jj] * b, kn = K - c < b ? K - c : b;                      \
        const T *w = wt + jj * b * b;                                                             \
        for (int64_t i = 0; i < kn; i++) {                                                        \
            V wv[BC_NW];                                                                          \
            _Pragma("GCC unroll 2") for (int u = 0; u < BC_NW; u++) {                            \
                wv[u] = FN(ld)(w + i * b + u * VL); SG_IN_REG(wv[u]);                            \
            }                                                                                    \
            const T *xr = X + roff[c + i];                                                        \
            __asm__("" : "+r"(xr));  /* xr[t] as one register + offset: indexed, the fused FMA splits */ \
            _Pragma("GCC unroll 32") for (int t = 0; t < P; t++) {                                \
                const T a = xr[t];                                                                \
                _Pragma("GCC unroll 2") for (int u = 0; u < BC_NW; u++) acc[t][u] += wv[u] * a;   \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    _Pragma("GCC unroll 32") for (int t = 0; t < P; t++)                                          \
        _Pragma("GCC unroll 2") for (int u = 0; u < BC_NW; u++) FN(st)(ab + (u * lda + t) * VL, acc[t][u]); \
}
/* P lanes per tile, widest first, beside BC_NW vectors of output channels: 28 x 1 with AVX-512 (its
 * FMA takes the broadcast from memory); with 16 registers 6 or 5 x 2 and a broadcast register, half
 * the broadcasts per multiply-add (14-8 x 1 took 1.07-1.40x its time on the widened ResNet-18's 3x3
 * layers, blocks 16 and 32, s = 0.75 and 0.9, batch 32, one thread, Zen 3; 0.87-1.32x at two
 * threads); 4 or 3 x 2 tiles, whose 8 or 6 accumulators cannot hide the FMA's latency, lost that
 * again on the layers whose lanes chose them */
#if SG_NREG >= 32
#define BC_NW 1
#define BC_TILES(X) X(28) X(24) X(20) X(16)
#define BC_MIN_LANES 112  /* four tiles of the widest */
#define BC_MAX_TILES 16  /* tiles of the widest per work item at most */
#else
#define BC_NW 2
#define BC_TILES(X) X(6) X(5)
#define BC_MIN_LANES 56  /* four tiles of 14 x 1, where it was measured */
#define BC_MAX_TILES 24
#endif
BC_TILES(MK_BC)
typedef void (*FN(mk_bc_fn))(int64_t, const int32_t *, const T *, int64_t, int64_t, const T *, const int64_t *, T *,
                             int64_t, int);
#define BC_ENTRY(P) {P, FN(mk_bc_##P)},
static const struct { int64_t p; FN(mk_bc_fn) f; } FN(bc_tiles)[] = {BC_TILES(BC_ENTRY)};
#define BC_NTILES ((int)(sizeof(FN(bc_tiles)) / sizeof(FN(bc_tiles)[0])))
#undef BC_ENTRY
#undef BC_TILES
#define BC_XBYTES (512 * 1024)
#define BC_WBYTES (1024 * 1024)
#define BC_JG(b) ((b) * 128 < 16384 ? 16384 / ((b) * 128) : 1)  /* blocks per group: 16 KiB of W's rows and x */
static int FN(conv2d_bcast)(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OUT, int64_t KH, int64_t KW,
                            int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t S, int64_t b, const T *x,
                            const T *vals, const int32_t *crow, const int32_t *col, const T *bias, T *y,
                            int nthreads) {
    const int64_t P0 = FN(bc_tiles)[0].p;
    const int64_t Ho = H + 2 * PH - DH * (KH - 1), Wo = W + 2 * PW - DW * (KW - 1);
    const int64_t L = Ho * Wo, Le = (Ho - 1) * S + Wo, K = C * KH * KW, R = (OUT + b - 1) / b;
    const int64_t plane = sg_pad_plane(H, PH, PW, S);
    const int64_t reach = (KH - 1) * DH * S + (KW - 1) * DW, nnzb = crow[R];
    int64_t G = 1, NG = N, nlb = 1, P = 0, ltw = 0, tile = 0;
    for (int64_t g1 = 1; g1 <= N; g1++) {  /* images per group, lanes per item and tile: the fewest lanes computed */
        const int64_t ng = (N + g1 - 1) / g1, g = (N + ng - 1) / ng;  /* groups of equal size */
        if (g != g1) continue;
        int64_t tl = BC_XBYTES / (C * (int64_t)sizeof(T)) - reach * g;  /* lanes of an item: its x in L2 */
        tl = tl < 4 * P0 ? 4 * P0 : tl > BC_MAX_TILES * P0 ? BC_MAX_TILES * P0 : tl;
        if (g > 1 && reach * g > tl) break;  /* an item would read more of x around its lanes than in them */
        const int64_t nl = (Le * g + tl - 1) / tl;
        for (int q = 0; q < BC_NTILES; q++) {
            const int64_t pq = FN(bc_tiles)[q].p, w = ((Le * g + nl - 1) / nl + pq - 1) / pq * pq;
            if (P == 0 || ng * nl * w < NG * nlb * ltw) G = g, NG = ng, nlb = nl, P = pq, ltw = w, tile = q;
        }
    }
    const int64_t lanes = Le * G;
    int64_t RG = (nnzb * b * b * (int64_t)sizeof(T) + BC_WBYTES - 1) / BC_WBYTES;  /* a group's weights in L2 */
    if (NG * nlb * RG < 4 * nthreads) RG = (4 * nthreads + NG * nlb - 1) / (NG * nlb);
    RG = RG < 1 ? 1 : RG > R ? R : RG;
    const int64_t per = (R + RG - 1) / RG;
    T *xp = (T *)sg_scratch(SG_X, sizeof(T) * (size_t)(NG * C * plane * G + nlb * ltw));
    int64_t *roff = (int64_t *)sg_scratch(SG_IDX, sizeof(int64_t) * (size_t)K);
    T *wt = (T *)sg_scratch(SG_W, sizeof(T) * (size_t)(nnzb * b * b));
    if (xp == NULL || roff == NULL || wt == NULL) return 1;
    memset(xp + NG * C * plane * G, 0, sizeof(T) * nlb * ltw);
    FN(pad_images)(xp, roff, x, N, C, H, W, KH, KW, PH, PW, DH, DW, S, G, NG, nthreads);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < nnzb; j++) FN(transpose_block)(wt + j * b * b, vals + j * b * b, b);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        const int64_t ldt = ltw + VL, lda = (ltw + VL - 1) / VL * VL;  /* ytile (outputs, lanes), slack past ltw */
        T *ytile = (T *)sg_scratch(SG_TILE, (size_t)(per * b * ldt) * sizeof(T));
        T *ab = (T *)sg_scratch(SG_TILE2, (size_t)(BC_NW * lda * VL) * sizeof(T));  /* BC_NW x (lanes, VL outputs) */
        failed = ytile == NULL || ab == NULL;
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t g = 0; g < RG; g++)  /* a group of block-rows, its weights in L2, over all lanes */
            for (int64_t p = 0; p < NG; p++)
                for (int64_t t = 0; t < nlb; t++) {
                    if (failed) continue;
                    const int64_t r0 = g * per, r1 = (g + 1) * per < R ? (g + 1) * per : R, lb = t * ltw;
                    const T *X = xp + p * C * plane * G + lb;
                    for (int64_t r = r0; r < r1; r++)
                        for (int64_t v = 0; v < b && r * b + v < OUT; v += BC_NW * VL) {
                            const int64_t j0 = crow[r], nz = crow[r + 1] - j0;
                            const T *w = wt + j0 * b * b + v;
                            T *yt = ytile + ((r - r0) * b + v) * ldt;
                            /* the row's blocks in groups of at most BC_JG, each over every tile */
                            const int64_t ngr = (nz + BC_JG(b) - 1) / BC_JG(b);
                            const int64_t gs = ngr > 1 ? (nz + ngr - 1) / ngr : 1 + nz;  /* (one group if none) */
                            for (int64_t g0 = 0; g0 == 0 || g0 < nz; g0 += gs)
                                for (int64_t l0 = 0; l0 < ltw; l0 += P)
                                    FN(bc_tiles)[tile].f(nz - g0 < gs ? nz - g0 : gs, col + j0 + g0, w + g0 * b * b, b,
                                                         K, X + l0, roff, ab + l0 * VL, lda, g0 > 0);
                            for (int u = 0; u < BC_NW; u++)  /* (lanes, VL outputs) -> VL rows of lanes */
                                for (int64_t q = 0; q < ltw; q += VL)
                                    FN(transpose_tile)(yt + u * VL * ldt + q, ldt, ab + (u * lda + q) * VL, VL);
                            if (bias)
                                for (int64_t o = 0; o < BC_NW * VL && r * b + v + o < OUT; o++)
                                    for (int64_t l = 0; l < ltw; l++) yt[o * ldt + l] += bias[r * b + v + o];
                        }
                    const int64_t o1 = r1 * b < OUT ? r1 * b : OUT, lt = lanes - lb < ltw ? lanes - lb : ltw;
                    FN(store_lanes)(y, ytile, ldt, r0 * b, o1, p, G, N, OUT, L, S, Wo, lb, lt);
                }
    }
    return failed;
}
#undef BC_XBYTES
#undef BC_WBYTES
#undef BC_JG

/* ------------------------------------------------------------------------------------------
 * direct convolution: y (N, OUT, Ho, Wo) = conv2d(x (N, C, H, W), W, bias) for a block-sparse
 * W viewed as (OUT, C*KH*KW) in (c, kh, kw) order. Output positions are taken LT at a time: the
 * im2col tile of those positions (K x LT, K = C*KH*KW) is built in a thread-local buffer (no
 * full-size im2col tensor, no page faults, no 4 KiB-strided rows), then the cols register tiles
 * multiply it. Work items are (image, position tile, group of block-rows).
 * ---------------------------------------------------------------------------------------- */
#define LT 64
int FN(sg_conv2d)(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OUT, int64_t KH, int64_t KW, int64_t SH,
                  int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t b, const T *x, const T *vals,
                  const int32_t *crow, const int32_t *col, const T *bias, T *y, int nthreads) {
    const int64_t Ho = (H + 2 * PH - DH * (KH - 1) - 1) / SH + 1, Wo = (W + 2 * PW - DW * (KW - 1) - 1) / SW + 1;
    if (Ho <= 0 || Wo <= 0) return 0;
    const int64_t L = Ho * Wo, K = C * KH * KW, R = (OUT + b - 1) / b;
    const int64_t S = W + PW > Wo ? W + PW : Wo;  /* pad_images' row stride (stride 1) */
    /* below BC_MIN_LANES lanes in all, the weights' transposition costs more than output channels along
       the vector save (batch 1 on 8 x 8 and 4 x 4 images: 1.04-1.14x the time of positions along it) */
    if (SH == 1 && SW == 1 && b % (BC_NW * VL) == 0 && N * ((Ho - 1) * S + Wo) >= BC_MIN_LANES)
        return FN(conv2d_bcast)(N, C, H, W, OUT, KH, KW, PH, PW, DH, DW, S, b, x, vals, crow, col, bias, y, nthreads);
    if (SH == 1 && SW == 1)
        return FN(conv2d_shifted)(N, C, H, W, OUT, KH, KW, PH, PW, DH, DW, S, b, x, vals, crow, col, bias, y, nthreads);
    const int64_t ntiles = (L + LT - 1) / LT, ltw = ((L + ntiles - 1) / ntiles + VL - 1) / VL * VL;  /* tile width */
    const int64_t OR = b >= 4 ? 4 : b >= 2 ? 2 : 1, LV = COLS_LV(OR);
    const int64_t items0 = N * ntiles;
    const int64_t RG = items0 >= 4 * nthreads ? 1 : (R < 4 * nthreads ? R : 4 * nthreads);
    const int64_t per = (R + RG - 1) / RG;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        T *buf = (T *)sg_scratch(SG_TILE, (size_t)(K * ltw + OR * ltw) * sizeof(T));
        failed = buf == NULL;
        T *ytile = buf ? buf + K * ltw : NULL;
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t p = 0; p < N; p++)
            for (int64_t t = 0; t < ntiles; t++)
                for (int64_t g = 0; g < RG; g++) {
                    if (failed) continue;
                    const int64_t l0 = t * ltw, lt = L - l0 < ltw ? L - l0 : ltw;
                    FN(im2col_tile)(buf, ltw, x + p * C * H * W, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, Wo, l0, lt);
                    const int64_t r1 = (g + 1) * per < R ? (g + 1) * per : R;
                    for (int64_t r = g * per; r < r1; r++) {
                        const int64_t o0 = r * b, ob = OUT - o0 < b ? OUT - o0 : b;
                        const int64_t j0 = crow[r], nz = crow[r + 1] - j0;
                        for (int64_t ob0 = 0; ob0 < ob; ob0 += OR) {
                            const int64_t orr = ob - ob0 < OR ? ob - ob0 : OR;
                            const T *bb = bias ? bias + o0 + ob0 : NULL;
                            T *Y = y + (p * OUT + o0 + ob0) * L + l0;
                            const int full = lt == ltw;
                            T *dst = full ? Y : ytile;
                            const int64_t ldy = full ? L : ltw;
                            int64_t c0 = 0;
                            for (; c0 + LV * VL <= ltw; c0 += LV * VL)
                                FN(cols_tile)(OR, LV, orr, col, j0, nz, NULL, vals, b, b, 1, ob0, buf + c0, ltw, NULL, K,
                                              dst + c0, ldy, bb, 0);
                            for (; c0 + 2 * VL <= ltw; c0 += 2 * VL)
                                FN(cols_tile)(OR, 2, orr, col, j0, nz, NULL, vals, b, b, 1, ob0, buf + c0, ltw, NULL, K,
                                              dst + c0, ldy, bb, 0);
                            for (; c0 < ltw; c0 += VL)
                                FN(cols_tile)(OR, 1, orr, col, j0, nz, NULL, vals, b, b, 1, ob0, buf + c0, ltw, NULL, K,
                                              dst + c0, ldy, bb, 0);
                            if (!full)
                                for (int64_t o = 0; o < orr; o++) memcpy(Y + o * L, ytile + o * ltw, sizeof(T) * lt);
                        }
                    }
                }
    }
    return failed;
}
#undef LT

/* ------------------------------------------------------------------------------------------
 * SDDMM, rows layout: dV[j](o, i) = sum_m G[m, o0 + o] X[m, c0 + i] on the nonzero blocks j of
 * B (out block-row r of j, in block col[j]); dV is (nnzb, b, b) in (out, in) orientation, zero
 * at ragged edges. An OT x IV tile (OT output rows, IV vectors of input lanes) runs down SDD_MC
 * rows at a time, adding to dV. Rows go in chunks whose panels fit in SDD_L2 bytes: the threads
 * first copy the chunk, row by row, into one contiguous, zero-padded (rows, b) panel per block
 * column of X, then take block-rows, copying each SDD_MC rows of the block-row's columns of G into
 * a panel of their own. Read in place, the rows of G and X lie a row stride apart (4 KiB for 1024
 * outputs), all in the same few L1 sets, and the tiles of each block re-read them from L2 (panels
 * per block: 1.6-2.2x as fast on GPT-sized layers at 1-2k rows, one thread); a panel of X copied
 * per block was copied again for every block of its column (one copy per chunk: another 1.2-1.9x
 * at 75% and 90% sparsity, 1 and 2 threads). When G's rows lie a page apart or more, its panels
 * too are copied per chunk, rows read whole: per block-row, each of the SDD_MC rows was on a page
 * of its own (0.77-1.03x the time, median 0.96, at 1024 and 4096 outputs, 75% and 90% sparse, 1
 * and 2 threads, Zen 3); with rows closer, the chunk's copy cost more than it saved (1.06-1.27x at
 * 256 outputs).
 * ---------------------------------------------------------------------------------------- */
#define MK_SDD_ROWS(OT, IV)                                                                      \
_Static_assert(SG_FITS(IV, OT), "register tile too large");                                     \
static void FN(mk_sdd_rows_##OT##_##IV)(int64_t M, const T *G, int64_t ldg, const T *X, int64_t ldx, \
        T *D, int64_t b) {                                                                       \
    V acc[OT][IV];                                                                               \
    _Pragma("GCC unroll 8") for (int t = 0; t < OT; t++)                                         \
        _Pragma("GCC unroll 2") for (int v = 0; v < IV; v++) acc[t][v] = FN(ld)(D + t * b + v * VL); \
    for (int64_t m = 0; m < M; m++) {                                                            \
        V xv[IV];                                                                                \
        _Pragma("GCC unroll 2") for (int v = 0; v < IV; v++) {                                   \
            xv[v] = FN(ld)(X + m * ldx + v * VL); SG_IN_REG(xv[v]);                              \
        }                                                                                        \
        const T *g = G + m * ldg;                                                                \
        _Pragma("GCC unroll 8") for (int t = 0; t < OT; t++) {                                   \
            const T a = g[t];                                                                    \
            _Pragma("GCC unroll 2") for (int v = 0; v < IV; v++) acc[t][v] += xv[v] * a;         \
        }                                                                                        \
    }                                                                                            \
    _Pragma("GCC unroll 8") for (int t = 0; t < OT; t++)                                         \
        _Pragma("GCC unroll 2") for (int v = 0; v < IV; v++) FN(st)(D + t * b + v * VL, acc[t][v]); \
}
/* exact tiles of SDD_OT, 4, 2 or 1 output rows beside two vectors of X, or one (with 16 registers
 * 6 x 2 took 0.54-0.98x the time of 8 x 1 on GPT-2 and Llama layers at 1-2k rows, one thread; one
 * tile of SDD_OT rows for fewer computed 36 rows of a 32-wide block and branched on the rows it
 * kept: exact tiles took 0.89-0.99x its time) */
#if SG_NREG >= 32
#define SDD_OT 8
#define SDD_TILES(X) X(8, 2) X(8, 1) X(4, 2) X(4, 1) X(2, 2) X(2, 1) X(1, 2) X(1, 1)
#else
#define SDD_OT 6
#define SDD_TILES(X) X(6, 2) X(6, 1) X(4, 2) X(4, 1) X(2, 2) X(2, 1) X(1, 2) X(1, 1)
#endif
SDD_TILES(MK_SDD_ROWS)
typedef void (*FN(mk_sdd_fn))(int64_t, const T *, int64_t, const T *, int64_t, T *, int64_t);
#define SDD_ROW(OT) ((OT) == SDD_OT ? 3 : (OT) / 2)  /* 1, 2, 4, SDD_OT -> 0..3 */
#define SDD_ENTRY(OT, IV) [SDD_ROW(OT)][IV - 1] = FN(mk_sdd_rows_##OT##_##IV),
static const FN(mk_sdd_fn) FN(sdd_table)[4][2] = {SDD_TILES(SDD_ENTRY)};

#define SDD_MC 64
#define SDD_L2 (1024 * 1024)  /* bytes of a chunk's panels */
int FN(sg_sddmm_rows)(int64_t M, int64_t IN, int64_t OUT, int64_t b, const T *G, int64_t ldg,
                       const T *X, int64_t ldx, const int32_t *crow, const int32_t *col, T *dV, int nthreads) {
    const int64_t R = (OUT + b - 1) / b, C = (IN + b - 1) / b, nnzb = crow[R];
    const double work = (double)M * (double)nnzb * (double)(b * b);
    const int64_t RG = ldg * (int64_t)sizeof(T) >= 4096 ? R : 0;  /* G's panels per chunk if its rows are pages apart */
    int64_t mcl = SDD_L2 / (int64_t)(sizeof(T) * (C + RG) * b) / SDD_MC * SDD_MC;
    mcl = mcl < SDD_MC ? SDD_MC : mcl > M ? M : mcl;
    /* the chunk's panels: X by block column (C, mcl, b), then G by block-row (RG, mcl, b) */
    T *Xk = (T *)sg_scratch(SG_X, sizeof(T) * (size_t)(mcl * (C + RG) * b)), *Gk = Xk + mcl * C * b;
    if (Xk == NULL) return 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed) if (work > 32768.0)
    {
        T *Gt = RG ? NULL : (T *)sg_scratch(SG_TILE, sizeof(T) * (size_t)(SDD_MC * b));  /* else G's, per block-row */
        failed = !RG && Gt == NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++)
            memset(dV + (int64_t)crow[r] * b * b, 0, sizeof(T) * (size_t)((crow[r + 1] - crow[r]) * b * b));
        for (int64_t ml = 0; ml < M; ml += mcl) {
            const int64_t mk = M - ml < mcl ? M - ml : mcl;
#pragma omp for schedule(static)
            for (int64_t m = 0; m < mk; m++) {  /* row m of X (and G), each block to its panel */
                for (int64_t c = 0; c < C; c++)
                    FN(panel_row)(Xk + (c * mcl + m) * b, X + (ml + m) * ldx + c * b, IN - c * b, b);
                for (int64_t r = 0; r < RG; r++)
                    FN(panel_row)(Gk + (r * mcl + m) * b, G + (ml + m) * ldg + r * b, OUT - r * b, b);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t r = 0; r < R; r++) {
                if (failed) continue;
                const int64_t ob = OUT - r * b < b ? OUT - r * b : b;
                for (int64_t m0 = 0; m0 < mk; m0 += SDD_MC) {
                    const int64_t mc = mk - m0 < SDD_MC ? mk - m0 : SDD_MC;
                    if (!RG)
                        for (int64_t m = 0; m < mc; m++)
                            FN(panel_row)(Gt + m * b, G + (ml + m0 + m) * ldg + r * b, ob, b);
                    const T *Gp = RG ? Gk + (r * mcl + m0) * b : Gt;
                    for (int64_t j = crow[r]; j < crow[r + 1]; j++) {
                        const T *Xp = Xk + ((int64_t)col[j] * mcl + m0) * b;
                        T *D = dV + j * b * b;
                        for (int64_t t0 = 0, ot; t0 < ob; t0 += ot) {
                            const int64_t left = ob - t0;
                            ot = left == SDD_OT || left >= SDD_OT + 4 ? SDD_OT : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                            const FN(mk_sdd_fn) *tile = FN(sdd_table)[SDD_ROW(ot)];
                            int64_t i0 = 0;
                            for (; i0 + 2 * VL <= b; i0 += 2 * VL)
                                tile[1](mc, Gp + t0, b, Xp + i0, b, D + t0 * b + i0, b);
                            for (; i0 + VL <= b; i0 += VL)
                                tile[0](mc, Gp + t0, b, Xp + i0, b, D + t0 * b + i0, b);
                            for (; i0 < b; i0++)
                                for (int64_t t = 0; t < ot; t++) {
                                    T s = 0;
                                    for (int64_t m = 0; m < mc; m++) s += Gp[m * b + t0 + t] * Xp[m * b + i0];
                                    D[(t0 + t) * b + i0] += s;
                                }
                        }
                    }
                }
            }
        }
    }
    return failed;
}
#undef SDD_MC
#undef SDD_L2
#undef SDD_OT
#undef SDD_TILES
#undef SDD_ROW
#undef SDD_ENTRY

/* ------------------------------------------------------------------------------------------
 * SDDMM, cols layout: dV[j](o, i) = sum_p sum_l G[p, o0 + o, l] X[p, c0 + i, l]; dot products
 * along the lanes l, an OT x IT tile of them at a time, reduced once at the end.
 * ---------------------------------------------------------------------------------------- */
#define MK_SDD_COLS(OT, IT)                                                                      \
static void FN(mk_sdd_cols_##OT##_##IT)(int64_t P, int64_t L, int64_t ot, int64_t it,            \
        const T *G, int64_t OUT, int64_t ob0, const T *X, int64_t IN, int64_t ib0, T *D, int64_t b) { \
    V acc[OT][IT];                                                                               \
    T tail[OT][IT];                                                                              \
    _Pragma("GCC unroll 4") for (int t = 0; t < OT; t++)                                         \
        _Pragma("GCC unroll 4") for (int u = 0; u < IT; u++) { acc[t][u] = (V){0}; tail[t][u] = 0; } \
    for (int64_t p = 0; p < P; p++) {                                                            \
        const T *gr[OT], *xr[IT];                                                                \
        _Pragma("GCC unroll 4") for (int t = 0; t < OT; t++) gr[t] = G + (p * OUT + ob0 + (t < ot ? t : ot - 1)) * L; \
        _Pragma("GCC unroll 4") for (int u = 0; u < IT; u++) xr[u] = X + (p * IN + ib0 + (u < it ? u : it - 1)) * L; \
        int64_t l = 0;                                                                           \
        for (; l + VL <= L; l += VL) {                                                           \
            V gv[OT], xv[IT];                                                                    \
            _Pragma("GCC unroll 4") for (int t = 0; t < OT; t++) { gv[t] = FN(ld)(gr[t] + l); SG_IN_REG(gv[t]); } \
            _Pragma("GCC unroll 4") for (int u = 0; u < IT; u++) { xv[u] = FN(ld)(xr[u] + l); SG_IN_REG(xv[u]); } \
            _Pragma("GCC unroll 4") for (int t = 0; t < OT; t++)                                 \
                _Pragma("GCC unroll 4") for (int u = 0; u < IT; u++) acc[t][u] += gv[t] * xv[u]; \
        }                                                                                        \
        for (; l < L; l++)                                                                       \
            for (int t = 0; t < OT; t++) for (int u = 0; u < IT; u++) tail[t][u] += gr[t][l] * xr[u][l]; \
    }                                                                                            \
    for (int64_t t = 0; t < ot; t++)                                                             \
        for (int64_t u = 0; u < it; u++) D[t * b + u] = FN(hsum)(acc[t][u]) + tail[t][u];        \
}
/* 4 x IT dot products: 4 IT accumulators beside 4 + IT loaded vectors */
#if SG_NREG >= 32
#define SDD_IT 4
MK_SDD_COLS(4, 4)
#define SDD_COLS FN(mk_sdd_cols_4_4)
#else
#define SDD_IT 2
MK_SDD_COLS(4, 2)
#define SDD_COLS FN(mk_sdd_cols_4_2)
#endif
MK_SDD_COLS(1, 1)

int FN(sg_sddmm_cols)(int64_t P, int64_t IN, int64_t OUT, int64_t L, int64_t b, const T *G, const T *X,
                       const int32_t *crow, const int32_t *col, T *dV, int nthreads) {
    const int64_t R = (OUT + b - 1) / b, nnzb = crow[R];
    int64_t *rowof = (int64_t *)sg_scratch(SG_IDX, sizeof(int64_t) * (size_t)nnzb);
    if (rowof == NULL) return 1;
    for (int64_t r = 0; r < R; r++) for (int64_t j = crow[r]; j < crow[r + 1]; j++) rowof[j] = r;
    const double work = (double)P * (double)L * (double)nnzb * (double)(b * b);
    const int64_t chunk = CHUNK(nnzb, nthreads);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads) if (work > 32768.0)
    for (int64_t j = 0; j < nnzb; j++) {
        const int64_t o0 = rowof[j] * b, ob = OUT - o0 < b ? OUT - o0 : b;
        const int64_t c0 = (int64_t)col[j] * b, kn = IN - c0 < b ? IN - c0 : b;
        T *D = dV + j * b * b;
        memset(D, 0, sizeof(T) * b * b);
        for (int64_t t0 = 0; t0 < ob; t0 += 4)
            for (int64_t u0 = 0; u0 < kn; u0 += SDD_IT) {
                const int64_t ot = ob - t0 < 4 ? ob - t0 : 4, it = kn - u0 < SDD_IT ? kn - u0 : SDD_IT;
                if (b == 1) FN(mk_sdd_cols_1_1)(P, L, 1, 1, G, OUT, o0, X, IN, c0, D, b);
                else SDD_COLS(P, L, ot, it, G, OUT, o0 + t0, X, IN, c0 + u0, D + t0 * b + u0, b);
            }
    }
    return 0;
}
#undef SDD_IT
#undef SDD_COLS
#undef V
#undef MI
"""


def source() -> str:
    """The full translation unit: BODY for float, then for double."""
    return (HEADER + "#define T float\n#define IT int32_t\n#define SUF _f32\n#define VL (SG_VBYTES / 4)\n" + BODY
            + "#undef T\n#undef IT\n#undef SUF\n#undef VL\n"
            + "#define T double\n#define IT int64_t\n#define SUF _f64\n#define VL (SG_VBYTES / 8)\n" + BODY)
