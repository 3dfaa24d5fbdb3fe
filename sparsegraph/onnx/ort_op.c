/* ONNX Runtime custom ops sparsegraph.SparseLinear and sparsegraph.SparseConv: the native block-sparse
 * kernels inside ONNX Runtime.
 *
 *   SparseLinear  Y (..., n) = X (..., k) @ B + bias      B (k, n) block-sparse, b x b blocks:
 *     values (nnzb, b, b)  each block stored (in, out), zero-padded at ragged edges
 *     crow   (ceil(n / b) + 1,) int32, col (nnzb,) int32: the blocks of output block-row r are
 *            crow[r] .. crow[r + 1], block j at input block col[j]
 *     bias   (n,), optional; attributes n and block
 *   SparseConv    Y (N, n, Ho, Wo) = conv2d(X (N, C, H, W), W, bias)   W (n, C kh kw) block-sparse in the
 *     same BSR form over W's (c, kh, kw) order, each block stored (out, in) as it sits in W; attributes
 *     n, block and the pairs kernel, stride, padding (the same before and after), dilation
 *
 * Appended to the kernels' translation unit (`cpu_source.source()`), so it calls them directly:
 * sg_rows_packed_f32 (blocks a multiple of the vector width) or sg_rows_f32 (any other block) for
 * SparseLinear; sg_cols_f32 (a 1x1 kernel without padding, on the positions it reads) or sg_conv2d_f32
 * for SparseConv. Built against ONNX Runtime's C API header and loaded with
 * SessionOptions.register_custom_ops_library; the API is requested at the header's version, which every
 * later ONNX Runtime serves. */
#undef T
#undef IT
#undef SUF
#undef VL
#undef V
#undef MI
#include <onnxruntime_c_api.h>
#include <limits.h>
#include <stdarg.h>
#include <omp.h>
#include <stdio.h>

static const OrtApi *sgo_api;
static int sgo_threads;  /* pieces of a product for ONNX Runtime's threads; 0: OpenMP's default thread count */
void sg_ort_set_threads(int n) { sgo_threads = n > 0 ? n : 0; }

/* an op's attributes: n, block and (SparseConv) kernel, stride, padding, dilation as (h, w) pairs */
typedef struct { const char *op; int conv; int64_t n, b, pairs[4][2]; } sgo_kernel_t;
static const char *const sgo_pairs[4] = {"kernel", "stride", "padding", "dilation"};

__attribute__((format(printf, 3, 4))) static OrtStatusPtr sgo_error(OrtErrorCode code, const char *op,
                                                                     const char *fmt, ...) {
    char msg[256];
    const int n = snprintf(msg, sizeof msg, "sparsegraph.%s: ", op);
    va_list args;
    va_start(args, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, args);
    va_end(args);
    return sgo_api->CreateStatus(code, msg);
}
#define LL(v) ((long long)(v))
#define SGO_TRY(call) do { OrtStatusPtr s_ = (call); if (s_) return s_; } while (0)

static OrtStatusPtr sgo_new_kernel(const OrtApi *api, const OrtKernelInfo *info, const char *op, int conv,
                                   void **kernel) {
    sgo_kernel_t k = {op, conv, 0, 0, {{0}}};
    SGO_TRY(api->KernelInfoGetAttribute_int64(info, "n", &k.n));
    SGO_TRY(api->KernelInfoGetAttribute_int64(info, "block", &k.b));
    if (k.n < 1 || k.b < 1)
        return sgo_error(ORT_INVALID_ARGUMENT, op, "n=%lld and block=%lld must be positive", LL(k.n), LL(k.b));
    for (int a = 0; conv && a < 4; a++) {
        size_t size = 2;
        SGO_TRY(api->KernelInfoGetAttributeArray_int64(info, sgo_pairs[a], k.pairs[a], &size));
        const int64_t least = a == 2 ? 0 : 1;  /* padding may be 0, the others at least 1 */
        if (size != 2 || k.pairs[a][0] < least || k.pairs[a][1] < least)
            return sgo_error(ORT_INVALID_ARGUMENT, op, "%s must be two values of at least %lld, got (%lld, %lld)",
                             sgo_pairs[a], LL(least), LL(k.pairs[a][0]), LL(size == 2 ? k.pairs[a][1] : -1));
    }
    sgo_kernel_t *p = (sgo_kernel_t *)malloc(sizeof *p);
    if (p == NULL) return sgo_error(ORT_FAIL, op, "out of memory");
    *p = k;
    *kernel = p;
    return NULL;
}
static OrtStatusPtr ORT_API_CALL sgo_create_v2(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                               void **kernel) {
    (void)op;
    return sgo_new_kernel(api, info, "SparseLinear", 0, kernel);
}
static OrtStatusPtr ORT_API_CALL sgo_create_conv_v2(const OrtCustomOp *op, const OrtApi *api,
                                                    const OrtKernelInfo *info, void **kernel) {
    (void)op;
    return sgo_new_kernel(api, info, "SparseConv", 1, kernel);
}
/* the version-1 entry points, on top of the version-2 ones: errors reported as a NULL kernel or not at all */
#define SGO_V1(CREATE, COMPUTE)                                                                       \
    static void *ORT_API_CALL CREATE(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) { \
        void *k = NULL;                                                                               \
        OrtStatusPtr s = CREATE##_v2(op, api, info, &k);                                              \
        if (s) api->ReleaseStatus(s);                                                                 \
        return k;                                                                                     \
    }                                                                                                 \
    static void ORT_API_CALL COMPUTE(void *kernel, OrtKernelContext *ctx) {                           \
        OrtStatusPtr s = COMPUTE##_v2(kernel, ctx);                                                   \
        if (s) sgo_api->ReleaseStatus(s);                                                             \
    }

/* the dimensions of a tensor (at most 8) */
static OrtStatusPtr sgo_dims(const char *op, const OrtValue *v, int64_t *dims, size_t *rank) {
    OrtTensorTypeAndShapeInfo *info;
    SGO_TRY(sgo_api->GetTensorTypeAndShape(v, &info));
    OrtStatusPtr s = sgo_api->GetDimensionsCount(info, rank);
    if (!s && *rank > 8) s = sgo_error(ORT_INVALID_ARGUMENT, op, "rank %zu over 8", *rank);
    if (!s) s = sgo_api->GetDimensions(info, dims, *rank);
    sgo_api->ReleaseTensorTypeAndShapeInfo(info);
    return s;
}
static void *sgo_data(const OrtValue *v) {
    void *p = NULL;
    OrtStatusPtr s = sgo_api->GetTensorMutableData((OrtValue *)v, &p);
    if (s) sgo_api->ReleaseStatus(s);
    return p;
}

/* The block-sparse operands, checked: inputs X, values, crow, col[, bias] of an op whose X gives `C` input
 * blocks (k = C * b, C = 0 for none); every check names what is wrong. */
typedef struct {
    const float *x, *vals, *bias;
    const int32_t *crow, *col;
    int64_t xd[8], nnzb;
    size_t xr;
} sgo_operands_t;
static OrtStatusPtr sgo_inputs_of(const sgo_kernel_t *kp, OrtKernelContext *ctx, sgo_operands_t *o) {
    const char *op = kp->op;
    const int64_t n = kp->n, b = kp->b, R = (n + b - 1) / b;
    size_t count;
    SGO_TRY(sgo_api->KernelContext_GetInputCount(ctx, &count));
    const OrtValue *in[5] = {NULL, NULL, NULL, NULL, NULL};
    for (size_t i = 0; i < count && i < 5; i++) SGO_TRY(sgo_api->KernelContext_GetInput(ctx, i, &in[i]));
    int64_t vd[8], cd[8], jd[8], bd[8];
    size_t vr, cr, jr, br;
    SGO_TRY(sgo_dims(op, in[0], o->xd, &o->xr));
    SGO_TRY(sgo_dims(op, in[1], vd, &vr));
    SGO_TRY(sgo_dims(op, in[2], cd, &cr));
    SGO_TRY(sgo_dims(op, in[3], jd, &jr));
    if (vr != 3 || vd[1] != b || vd[2] != b)
        return sgo_error(ORT_INVALID_ARGUMENT, op, "values must be (nnzb, %lld, %lld)", LL(b), LL(b));
    if (cr != 1 || cd[0] != R + 1)
        return sgo_error(ORT_INVALID_ARGUMENT, op, "crow must have %lld entries (n=%lld)", LL(R + 1), LL(n));
    if (jr != 1 || jd[0] != vd[0])
        return sgo_error(ORT_INVALID_ARGUMENT, op, "col has %lld entries for %lld blocks", LL(jr == 1 ? jd[0] : -1),
                         LL(vd[0]));
    o->nnzb = vd[0];
    o->x = (const float *)sgo_data(in[0]);
    o->vals = (const float *)sgo_data(in[1]);
    o->crow = (const int32_t *)sgo_data(in[2]);
    o->col = (const int32_t *)sgo_data(in[3]);
    o->bias = NULL;
    if (in[4]) {
        SGO_TRY(sgo_dims(op, in[4], bd, &br));
        if (br != 1 || bd[0] != n)
            return sgo_error(ORT_INVALID_ARGUMENT, op, "bias must be (%lld,), got %lld values", LL(n),
                             LL(br == 1 ? bd[0] : -1));
        o->bias = (const float *)sgo_data(in[4]);
    }
    return NULL;
}
/* crow from 0 to nnzb without decreasing, every col inside the C input blocks X gives */
static OrtStatusPtr sgo_check_layout(const sgo_kernel_t *kp, const sgo_operands_t *o, int64_t C) {
    const int64_t R = (kp->n + kp->b - 1) / kp->b;
    const int32_t *crow = o->crow, *col = o->col;
    if (crow[0] != 0 || crow[R] != o->nnzb)
        return sgo_error(ORT_INVALID_ARGUMENT, kp->op, "crow must run from 0 to %lld, ends at %lld", LL(o->nnzb),
                         LL(crow[R]));
    for (int64_t r = 0; r < R; r++)
        if (crow[r + 1] < crow[r])
            return sgo_error(ORT_INVALID_ARGUMENT, kp->op, "crow decreases at block-row %lld of %lld", LL(r), LL(R));
    for (int64_t j = 0; j < o->nnzb; j++)
        if (col[j] < 0 || col[j] >= C)
            return sgo_error(ORT_INVALID_ARGUMENT, kp->op, "col %lld out of range for %lld input blocks of X",
                             LL(col[j]), LL(C));
    return NULL;
}
/* no inputs (k = 0): the bias (or zeros) in each of `count` runs of `n` outputs, each repeated `rep` times */
static void sgo_fill_bias(float *y, const float *bias, int64_t count, int64_t n, int64_t rep) {
    for (int64_t m = 0; m < count; m++)
        for (int64_t o = 0; o < n; o++)
            for (int64_t l = 0; l < rep; l++) y[(m * n + o) * rep + l] = bias ? bias[o] : 0.0f;
}

/* One product, cut into `pieces` run on ONNX Runtime's own thread pool (KernelContext_ParallelFor), each
 * a one-thread call of the kernels: no OpenMP team beside ONNX Runtime's threads on the same cores. A piece
 * is a share of the rows of x (images of X), or of W's block-rows. */
typedef struct {
    int64_t M, k, n, b;  /* SparseLinear: (M, k) @ (k, n); SparseConv: M images */
    const sgo_kernel_t *kp;
    const sgo_operands_t *o;
    const float *x;  /* SparseConv's 1x1 kernel: X at the positions it reads, else X */
    int64_t C, H, W, L, cols;  /* SparseConv: X (M, C, H, W), L output positions; cols: the 1x1 path */
    float *y;
    int64_t pieces, by_rows;
    int failed;
} sgo_job_t;
static int sgo_call(const sgo_job_t *j, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
    const sgo_operands_t *o = j->o;
    const int64_t b = j->b, o0 = r0 * b, out = (r1 * b < j->n ? r1 * b : j->n) - o0, j0 = o->crow[r0];
    const float *bias = o->bias ? o->bias + o0 : NULL, *vals = o->vals + j0 * b * b;
    const int32_t *col = o->col + j0, *crow = o->crow + r0;
    int32_t *own = NULL;  /* a share of the block-rows: their blocks numbered from 0 (the kernels size and
                             transpose W's blocks 0 .. crow[R]) */
    if (j0 > 0) {
        if ((own = (int32_t *)malloc(sizeof(int32_t) * (size_t)(r1 - r0 + 1))) == NULL) return 1;
        for (int64_t r = r0; r <= r1; r++) own[r - r0] = o->crow[r] - (int32_t)j0;
        crow = own;
    }
    int failed = 0;
    if (!j->kp->conv) {  /* SparseLinear */
        failed = (b % (sg_vector_bytes() / 4) == 0 ? sg_rows_packed_f32 : sg_rows_f32)(
            m1 - m0, j->k, out, b, j->x + m0 * j->k, j->k, vals, crow, col, NULL, 0, bias, j->y + m0 * j->n + o0,
            j->n, 1);
    } else {  /* SparseConv: Y's images are (n, L), so a share of the block-rows runs image by image */
        const int64_t step = out == j->n ? m1 - m0 : 1, (*c)[2] = j->kp->pairs;
        for (int64_t m = m0; m < m1 && !failed; m += step) {
            const float *x = j->x + m * j->C * (j->cols ? j->L : j->H * j->W);
            float *y = j->y + m * j->n * j->L + o0 * j->L;
            failed = j->cols ? sg_cols_f32(step, j->C, out, j->L, b, x, vals, crow, col, NULL, b, 1, bias, y, 1)
                             : sg_conv2d_f32(step, j->C, j->H, j->W, out, c[0][0], c[0][1], c[1][0], c[1][1], c[2][0],
                                             c[2][1], c[3][0], c[3][1], b, x, vals, crow, col, bias, y, 1);
        }
    }
    free(own);
    return failed;
}
static void sgo_piece(void *data, size_t i) {
    sgo_job_t *j = (sgo_job_t *)data;
    const int64_t R = (j->n + j->b - 1) / j->b, P = j->pieces;
    int64_t m0 = 0, m1 = j->M, r0 = 0, r1 = R;
    if (j->by_rows) { m0 = j->M * (int64_t)i / P; m1 = j->M * ((int64_t)i + 1) / P; }
    else { r0 = R * (int64_t)i / P; r1 = R * ((int64_t)i + 1) / P; }
    if (m1 > m0 && r1 > r0 && sgo_call(j, m0, m1, r0, r1)) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
}
/* the job on `threads` pieces (or in one call): x's rows when x outweighs the blocks, else block-rows */
static OrtStatusPtr sgo_run(OrtKernelContext *ctx, sgo_job_t *job, int64_t x_size) {
    const int64_t R = (job->n + job->b - 1) / job->b;
    const int64_t threads = sgo_threads ? sgo_threads : omp_get_max_threads();
    job->pieces = 1;
    job->by_rows = 0;
    job->failed = 0;
    if (threads > 1 && (job->M >= threads || R >= threads)) {
        job->by_rows = job->M >= threads && x_size > job->o->nnzb * job->b * job->b;
        job->pieces = job->by_rows ? threads : R < threads ? R : threads;
        SGO_TRY(sgo_api->KernelContext_ParallelFor(ctx, sgo_piece, (size_t)job->pieces, 0, job));
    } else {
        sgo_piece(job, 0);
    }
    return job->failed ? sgo_error(ORT_FAIL, job->kp->op, "out of memory") : NULL;
}

static OrtStatusPtr ORT_API_CALL sgo_compute_v2(void *kernel, OrtKernelContext *ctx) {
    const sgo_kernel_t *kp = (const sgo_kernel_t *)kernel;
    const int64_t n = kp->n, b = kp->b;
    sgo_operands_t o;
    SGO_TRY(sgo_inputs_of(kp, ctx, &o));
    if (o.xr < 1) return sgo_error(ORT_INVALID_ARGUMENT, kp->op, "X is a scalar");
    int64_t M = 1;
    for (size_t i = 0; i + 1 < o.xr; i++) M *= o.xd[i];  /* X (..., k) as (M, k) */
    const int64_t k = o.xd[o.xr - 1];
    SGO_TRY(sgo_check_layout(kp, &o, (k + b - 1) / b));
    int64_t yd[8];
    memcpy(yd, o.xd, sizeof(int64_t) * o.xr);
    yd[o.xr - 1] = n;
    OrtValue *out;
    SGO_TRY(sgo_api->KernelContext_GetOutput(ctx, 0, yd, o.xr, &out));
    if (M == 0) return NULL;
    float *y = (float *)sgo_data(out);
    if (k == 0) { sgo_fill_bias(y, o.bias, M, n, 1); return NULL; }
    sgo_job_t job = {.M = M, .k = k, .n = n, .b = b, .kp = kp, .o = &o, .x = o.x, .y = y};
    return sgo_run(ctx, &job, M * k);
}

static OrtStatusPtr ORT_API_CALL sgo_compute_conv_v2(void *kernel, OrtKernelContext *ctx) {
    const sgo_kernel_t *kp = (const sgo_kernel_t *)kernel;
    const int64_t n = kp->n, b = kp->b, (*c)[2] = kp->pairs;
    sgo_operands_t o;
    SGO_TRY(sgo_inputs_of(kp, ctx, &o));
    if (o.xr != 4) return sgo_error(ORT_INVALID_ARGUMENT, kp->op, "X must be (N, C, H, W), got rank %zu", o.xr);
    const int64_t N = o.xd[0], C = o.xd[1], H = o.xd[2], W = o.xd[3], K = C * c[0][0] * c[0][1];
    SGO_TRY(sgo_check_layout(kp, &o, (K + b - 1) / b));
    const int64_t Ho = (H + 2 * c[2][0] - c[3][0] * (c[0][0] - 1) - 1) / c[1][0] + 1;
    const int64_t Wo = (W + 2 * c[2][1] - c[3][1] * (c[0][1] - 1) - 1) / c[1][1] + 1;
    if (H + 2 * c[2][0] < c[3][0] * (c[0][0] - 1) + 1 || W + 2 * c[2][1] < c[3][1] * (c[0][1] - 1) + 1)
        return sgo_error(ORT_INVALID_ARGUMENT, kp->op, "X's image (%lld x %lld) is smaller than the kernel's reach",
                         LL(H), LL(W));
    int64_t yd[4] = {N, n, Ho, Wo};
    OrtValue *out;
    SGO_TRY(sgo_api->KernelContext_GetOutput(ctx, 0, yd, 4, &out));
    if (N == 0) return NULL;
    float *y = (float *)sgo_data(out);
    if (K == 0) { sgo_fill_bias(y, o.bias, N, n, Ho * Wo); return NULL; }
    sgo_job_t job = {.M = N, .n = n, .b = b, .kp = kp, .o = &o, .x = o.x, .C = C, .H = H, .W = W, .L = Ho * Wo,
                     .y = y};
    /* a 1x1 kernel without padding is Y (N, n, L) = W X (N, C, L) on the positions it reads: the cols kernel
     * on X itself (stride 1) or on a copy of those positions, without the direct kernel's padded copy */
    job.cols = c[0][0] == 1 && c[0][1] == 1 && c[2][0] == 0 && c[2][1] == 0;
    float *xs = NULL;
    if (job.cols && (c[1][0] > 1 || c[1][1] > 1)) {
        if ((xs = (float *)malloc(sizeof(float) * (size_t)(N * C * Ho * Wo))) == NULL)
            return sgo_error(ORT_FAIL, kp->op, "out of memory");
        for (int64_t p = 0; p < N * C; p++)
            for (int64_t h = 0; h < Ho; h++)
                for (int64_t w = 0; w < Wo; w++)
                    xs[(p * Ho + h) * Wo + w] = o.x[(p * H + h * c[1][0]) * W + w * c[1][1]];
        job.x = xs;
    }
    OrtStatusPtr s = sgo_run(ctx, &job, N * C * H * W);
    free(xs);
    return s;
}
SGO_V1(sgo_create, sgo_compute)
SGO_V1(sgo_create_conv, sgo_compute_conv)
static void ORT_API_CALL sgo_destroy(void *kernel) { free(kernel); }

static const char *ORT_API_CALL sgo_name(const OrtCustomOp *op) { (void)op; return "SparseLinear"; }
static const char *ORT_API_CALL sgo_name_conv(const OrtCustomOp *op) { (void)op; return "SparseConv"; }
static const char *ORT_API_CALL sgo_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType ORT_API_CALL sgo_input_type(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i == 2 || i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL sgo_inputs(const OrtCustomOp *op) { (void)op; return 5; }
static ONNXTensorElementDataType ORT_API_CALL sgo_output_type(const OrtCustomOp *op, size_t i) {
    (void)op; (void)i;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL sgo_outputs(const OrtCustomOp *op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL sgo_input_kind(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i == 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL sgo_output_kind(const OrtCustomOp *op, size_t i) {
    (void)op; (void)i;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL sgo_memory(const OrtCustomOp *op, size_t i) {
    (void)op; (void)i;
    return OrtMemTypeDefault;
}
static int ORT_API_CALL sgo_one(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL sgo_last_version(const OrtCustomOp *op) { (void)op; return INT_MAX; }
static size_t ORT_API_CALL sgo_no_pairs(int **in, int **out) { *in = NULL; *out = NULL; return 0; }
static void ORT_API_CALL sgo_free_pairs(int *in, int *out) { (void)in; (void)out; }

/* the two ops differ only in name, kernel creation and computation */
#define SGO_OP(NAME, CREATE, COMPUTE)                                                             \
    {.version = ORT_API_VERSION, .CreateKernel = CREATE, .GetName = NAME,                           \
     .GetExecutionProviderType = sgo_provider, .GetInputType = sgo_input_type,                      \
     .GetInputTypeCount = sgo_inputs, .GetOutputType = sgo_output_type, .GetOutputTypeCount = sgo_outputs, \
     .KernelCompute = COMPUTE, .KernelDestroy = sgo_destroy, .GetInputCharacteristic = sgo_input_kind, \
     .GetOutputCharacteristic = sgo_output_kind, .GetInputMemoryType = sgo_memory,                  \
     .GetVariadicInputMinArity = sgo_one, .GetVariadicInputHomogeneity = sgo_one,                   \
     .GetVariadicOutputMinArity = sgo_one, .GetVariadicOutputHomogeneity = sgo_one,                 \
     .CreateKernelV2 = CREATE##_v2, .KernelComputeV2 = COMPUTE##_v2, .InferOutputShapeFn = NULL,    \
     .GetStartVersion = sgo_one, .GetEndVersion = sgo_last_version, .GetMayInplace = sgo_no_pairs,  \
     .ReleaseMayInplace = sgo_free_pairs, .GetAliasMap = sgo_no_pairs, .ReleaseAliasMap = sgo_free_pairs}
static const OrtCustomOp sgo_ops[2] = {SGO_OP(sgo_name, sgo_create, sgo_compute),
                                       SGO_OP(sgo_name_conv, sgo_create_conv, sgo_compute_conv)};

/* ONNX Runtime calls this when a session's options register the library. The domain must outlive
 * every session that uses it, so it is never released (one small object per registration). */
OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    sgo_api = base->GetApi(ORT_API_VERSION);
    if (sgo_api == NULL) return NULL;  /* (no API to report with: ONNX Runtime then fails to find the op) */
    OrtCustomOpDomain *domain;
    SGO_TRY(sgo_api->CreateCustomOpDomain("sparsegraph", &domain));
    for (int i = 0; i < 2; i++) SGO_TRY(sgo_api->CustomOpDomain_Add(domain, &sgo_ops[i]));
    return sgo_api->AddCustomOpDomain(options, domain);
}
