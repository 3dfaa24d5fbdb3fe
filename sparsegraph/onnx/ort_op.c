/* ONNX Runtime custom op sparsegraph.SparseLinear: the native block-sparse kernels inside ONNX Runtime.
 *
 *   Y (..., n) = X (..., k) @ B + bias      B (k, n) block-sparse, b x b blocks:
 *     values (nnzb, b, b)  each block stored (in, out), zero-padded at ragged edges
 *     crow   (ceil(n / b) + 1,) int32, col (nnzb,) int32: the blocks of output block-row r are
 *            crow[r] .. crow[r + 1], block j at input block col[j]
 *     bias   (n,), optional; attributes n and block
 *
 * Appended to the kernels' translation unit (`cpu_source.source()`), so it calls sg_rows_packed_f32
 * (blocks a multiple of the vector width) or sg_rows_f32 (any other block) directly. Built against
 * ONNX Runtime's C API header and loaded with SessionOptions.register_custom_ops_library; the API is
 * requested at the header's version, which every later ONNX Runtime serves. */
#undef T
#undef IT
#undef SUF
#undef VL
#undef V
#undef MI
#include <onnxruntime_c_api.h>
#include <limits.h>
#include <omp.h>
#include <stdio.h>

static const OrtApi *sgo_api;
static int sgo_threads;  /* pieces of a product for ONNX Runtime's threads; 0: OpenMP's default thread count */
void sg_ort_set_threads(int n) { sgo_threads = n > 0 ? n : 0; }

typedef struct { int64_t n, b; } sgo_kernel_t;

static OrtStatusPtr sgo_error(OrtErrorCode code, const char *fmt, long long a, long long b) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, a, b);
    return sgo_api->CreateStatus(code, msg);
}
#define SGO_TRY(call) do { OrtStatusPtr s_ = (call); if (s_) return s_; } while (0)

static OrtStatusPtr ORT_API_CALL sgo_create_v2(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                               void **kernel) {
    (void)op;
    int64_t n, b;
    SGO_TRY(api->KernelInfoGetAttribute_int64(info, "n", &n));
    SGO_TRY(api->KernelInfoGetAttribute_int64(info, "block", &b));
    if (n < 1 || b < 1)
        return sgo_error(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: n=%lld and block=%lld must be positive",
                         n, b);
    sgo_kernel_t *k = (sgo_kernel_t *)malloc(sizeof *k);
    if (k == NULL) return api->CreateStatus(ORT_FAIL, "sparsegraph.SparseLinear: out of memory");
    k->n = n;
    k->b = b;
    *kernel = k;
    return NULL;
}
static void *ORT_API_CALL sgo_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
    void *k = NULL;
    OrtStatusPtr s = sgo_create_v2(op, api, info, &k);
    if (s) api->ReleaseStatus(s);
    return k;
}

/* the dimensions of a tensor (at most 8) */
static OrtStatusPtr sgo_dims(const OrtValue *v, int64_t *dims, size_t *rank) {
    OrtTensorTypeAndShapeInfo *info;
    SGO_TRY(sgo_api->GetTensorTypeAndShape(v, &info));
    OrtStatusPtr s = sgo_api->GetDimensionsCount(info, rank);
    if (!s && *rank > 8) s = sgo_error(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: rank %lld over %lld",
                                       (long long)*rank, 8);
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

/* One product, cut into `pieces` run on ONNX Runtime's own thread pool (KernelContext_ParallelFor), each
 * a one-thread call of the kernels: no OpenMP team beside ONNX Runtime's threads on the same cores. */
typedef struct {
    int64_t M, k, n, b;
    const float *x, *vals, *bias;
    const int32_t *crow, *col;
    float *y;
    int64_t pieces, by_rows;
    int failed;
} sgo_job_t;
static void sgo_piece(void *data, size_t i) {
    sgo_job_t *j = (sgo_job_t *)data;
    const int64_t R = (j->n + j->b - 1) / j->b, P = j->pieces;
    int64_t m0 = 0, m1 = j->M, r0 = 0, r1 = R;
    if (j->by_rows) { m0 = j->M * (int64_t)i / P; m1 = j->M * ((int64_t)i + 1) / P; }
    else { r0 = R * (int64_t)i / P; r1 = R * ((int64_t)i + 1) / P; }
    const int64_t o0 = r0 * j->b, out = (r1 * j->b < j->n ? r1 * j->b : j->n) - o0;
    if (m1 <= m0 || out <= 0) return;
    const float *x = j->x + m0 * j->k, *bias = j->bias ? j->bias + o0 : NULL;
    float *y = j->y + m0 * j->n + o0;
    const int failed = (j->b % (sg_vector_bytes() / 4) == 0 ? sg_rows_packed_f32 : sg_rows_f32)(
        m1 - m0, j->k, out, j->b, x, j->k, j->vals, j->crow + r0, j->col, NULL, 0, bias, y, j->n, 1);
    if (failed) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
}

static OrtStatusPtr ORT_API_CALL sgo_compute_v2(void *kernel, OrtKernelContext *ctx) {
    const sgo_kernel_t *kp = (const sgo_kernel_t *)kernel;
    const int64_t n = kp->n, b = kp->b, R = (n + b - 1) / b;
    size_t count;
    SGO_TRY(sgo_api->KernelContext_GetInputCount(ctx, &count));
    const OrtValue *in[5] = {NULL, NULL, NULL, NULL, NULL};
    for (size_t i = 0; i < count && i < 5; i++) SGO_TRY(sgo_api->KernelContext_GetInput(ctx, i, &in[i]));
    int64_t xd[8], vd[8], cd[8], jd[8], bd[8], M = 1;
    size_t xr, vr, cr, jr, br;
    SGO_TRY(sgo_dims(in[0], xd, &xr));
    SGO_TRY(sgo_dims(in[1], vd, &vr));
    SGO_TRY(sgo_dims(in[2], cd, &cr));
    SGO_TRY(sgo_dims(in[3], jd, &jr));
    if (xr < 1) return sgo_api->CreateStatus(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: X is a scalar");
    for (size_t i = 0; i + 1 < xr; i++) M *= xd[i];  /* X (..., k) as (M, k) */
    const int64_t k = xd[xr - 1], C = (k + b - 1) / b;
    if (vr != 3 || vd[1] != b || vd[2] != b)
        return sgo_error(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: values must be (nnzb, %lld, %lld)", b, b);
    if (cr != 1 || cd[0] != R + 1)
        return sgo_error(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: crow must have %lld entries (n=%lld)",
                         R + 1, n);
    if (jr != 1 || jd[0] != vd[0])
        return sgo_error(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: col has %lld entries for %lld blocks",
                         jr == 1 ? jd[0] : -1, vd[0]);
    const float *x = (const float *)sgo_data(in[0]), *vals = (const float *)sgo_data(in[1]), *bias = NULL;
    const int32_t *crow = (const int32_t *)sgo_data(in[2]), *col = (const int32_t *)sgo_data(in[3]);
    if (in[4]) {
        SGO_TRY(sgo_dims(in[4], bd, &br));
        if (br != 1 || bd[0] != n)
            return sgo_error(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: bias must be (%lld,), got %lld values",
                             n, br == 1 ? bd[0] : -1);
        bias = (const float *)sgo_data(in[4]);
    }
    if (crow[0] != 0 || crow[R] != vd[0])
        return sgo_error(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: crow must run from 0 to %lld, ends at %lld",
                         vd[0], crow[R]);
    for (int64_t r = 0; r < R; r++)
        if (crow[r + 1] < crow[r])
            return sgo_error(ORT_INVALID_ARGUMENT, "sparsegraph.SparseLinear: crow decreases at block-row %lld of %lld",
                             r, R);
    for (int64_t j = 0; j < vd[0]; j++)
        if (col[j] < 0 || col[j] >= C)
            return sgo_error(ORT_INVALID_ARGUMENT,
                             "sparsegraph.SparseLinear: col %lld out of range for %lld input blocks (X's last axis)",
                             col[j], C);
    int64_t yd[8];
    memcpy(yd, xd, sizeof(int64_t) * xr);
    yd[xr - 1] = n;
    OrtValue *out;
    SGO_TRY(sgo_api->KernelContext_GetOutput(ctx, 0, yd, xr, &out));
    if (M == 0) return NULL;
    float *y = (float *)sgo_data(out);
    if (k == 0) {  /* no inputs: the bias (or zeros) in every row */
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = 0; o < n; o++) y[m * n + o] = bias ? bias[o] : 0.0f;
        return NULL;
    }
    sgo_job_t job = {M, k, n, b, x, vals, bias, crow, col, y, 1, 0, 0};
    const int64_t threads = sgo_threads ? sgo_threads : omp_get_max_threads();
    if (threads > 1 && (M >= threads || R >= threads)) {
        /* split the larger operand's reads: rows of x when x outweighs the blocks, else block-rows */
        job.by_rows = M >= threads && M * k > vd[0] * b * b;
        job.pieces = job.by_rows ? threads : R < threads ? R : threads;
        SGO_TRY(sgo_api->KernelContext_ParallelFor(ctx, sgo_piece, (size_t)job.pieces, 0, &job));
    } else {
        sgo_piece(&job, 0);
    }
    return job.failed ? sgo_api->CreateStatus(ORT_FAIL, "sparsegraph.SparseLinear: out of memory") : NULL;
}
static void ORT_API_CALL sgo_compute(void *kernel, OrtKernelContext *ctx) {
    OrtStatusPtr s = sgo_compute_v2(kernel, ctx);
    if (s) sgo_api->ReleaseStatus(s);
}
static void ORT_API_CALL sgo_destroy(void *kernel) { free(kernel); }

static const char *ORT_API_CALL sgo_name(const OrtCustomOp *op) { (void)op; return "SparseLinear"; }
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

static const OrtCustomOp sgo_op = {
    .version = ORT_API_VERSION,
    .CreateKernel = sgo_create,
    .GetName = sgo_name,
    .GetExecutionProviderType = sgo_provider,
    .GetInputType = sgo_input_type,
    .GetInputTypeCount = sgo_inputs,
    .GetOutputType = sgo_output_type,
    .GetOutputTypeCount = sgo_outputs,
    .KernelCompute = sgo_compute,
    .KernelDestroy = sgo_destroy,
    .GetInputCharacteristic = sgo_input_kind,
    .GetOutputCharacteristic = sgo_output_kind,
    .GetInputMemoryType = sgo_memory,
    .GetVariadicInputMinArity = sgo_one,
    .GetVariadicInputHomogeneity = sgo_one,
    .GetVariadicOutputMinArity = sgo_one,
    .GetVariadicOutputHomogeneity = sgo_one,
    .CreateKernelV2 = sgo_create_v2,
    .KernelComputeV2 = sgo_compute_v2,
    .InferOutputShapeFn = NULL,
    .GetStartVersion = sgo_one,
    .GetEndVersion = sgo_last_version,
    .GetMayInplace = sgo_no_pairs,
    .ReleaseMayInplace = sgo_free_pairs,
    .GetAliasMap = sgo_no_pairs,
    .ReleaseAliasMap = sgo_free_pairs,
};

/* ONNX Runtime calls this when a session's options register the library. The domain must outlive
 * every session that uses it, so it is never released (one small object per registration). */
OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    sgo_api = base->GetApi(ORT_API_VERSION);
    if (sgo_api == NULL) return NULL;  /* (no API to report with: ONNX Runtime then fails to find the op) */
    OrtCustomOpDomain *domain;
    SGO_TRY(sgo_api->CreateCustomOpDomain("sparsegraph", &domain));
    SGO_TRY(sgo_api->CustomOpDomain_Add(domain, &sgo_op));
    return sgo_api->AddCustomOpDomain(options, domain);
}
