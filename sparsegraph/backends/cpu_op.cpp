// The CPU kernels of `sparsegraph::sparse_linear` (and of `sparse_linear_packed` and `sparse_conv2d`),
// registered with PyTorch's dispatcher.
//
// A call of the op from Python, from Inductor's generated code or from an exported program reaches
// the product without running Python. `CPU`: the arguments are checked here and the product runs in
// the native library (`cpu_source.py`, whose entry points `sg_op_init` receives) on the paths
// `cpu.linear` takes; every other case (another dtype, an index tensor that is not int32, dim != -1,
// impl "torch" or "triton", bad arguments, which then get the Python op's error message) goes to
// `sparsegraph::sparse_linear_py`, the op's Python body registered under a second name.
// `AutogradCPU`: the op's backward (as `_backward` in sparse_linear.py) as a
// torch::autograd::Function, skipped when nothing needs a gradient. Built by `cpu_op.py` against
// the running PyTorch's headers. `sparsegraph::sparse_linear_packed` (inference only, W's blocks given
// pre-transposed, as frozen compiled graphs pass them) and `sparsegraph::sparse_conv2d` get CPU
// kernels of their own the same way (the convolution keeps its Python autograd).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

namespace {

using at::Tensor;
using RowsPacked = int (*)(int64_t M, int64_t IN, int64_t OUT, int64_t b, const void *x, int64_t ldx, const void *w,
                           const int32_t *crow, const int32_t *col, const int32_t *perm, int trans, const void *bias,
                           void *y, int64_t ldy, int nthreads);
using Cols = int (*)(int64_t P, int64_t IN, int64_t OUT, int64_t L, int64_t b, const void *X, const void *vals,
                     const int32_t *crow, const int32_t *col, const int32_t *perm, int64_t so, int64_t si,
                     const void *bias, void *Y, int nthreads);
using Conv = int (*)(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OUT, int64_t KH, int64_t KW, int64_t SH,
                     int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t b, const void *x,
                     const void *vals, const int32_t *crow, const int32_t *col, const void *bias, void *y,
                     int nthreads);

struct Kernels {
  RowsPacked rows_packed = nullptr;  // blocks a multiple of the vector width: W's blocks transposed on the way
  RowsPacked rows = nullptr;         // other blocks, repacked per call
  Cols cols = nullptr;               // dot products along W's rows (few rows), or lanes along x^T's rows
  Conv conv2d = nullptr;             // direct convolution (any kernel size, stride, padding, dilation)
};
Kernels kernels[2];        // float32, float64
int64_t vector_bytes = 0;  // 0 until sg_op_init: every call takes the Python body
int64_t small_m, transpose_below_block, transpose_rows;  // cpu.SMALL_M, TRANSPOSE_BELOW_BLOCK, TRANSPOSE_ROWS

// sparse_linear(x, values, crow, col, crow_t, col_t, perm_t, bias, n, k, block, dim, impl)
using Linear = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                      const Tensor &, const std::optional<Tensor> &, int64_t, int64_t, int64_t, int64_t,
                      c10::string_view);
// sparse_linear_grad_input(dy, values, crow_t, col_t, perm_t, crow, col, n, k, block, dim, impl), and
// sparse_linear_grad_values(dy, x, crow, col, crow_t, col_t, perm_t, n, k, block, dim, impl)
using Grad = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                    const Tensor &, int64_t, int64_t, int64_t, int64_t, c10::string_view);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char *name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
// an op defined in Python (sparse_linear.py), looked up on first use at each place it is called
#define SG_OP(Sig, name) \
  ([]() -> const c10::TypedOperatorHandle<Sig> & { static const auto op = find<Sig>(name); return op; }())

bool is_index(const Tensor &t) {
  return t.is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous();
}

bool is_operand(const Tensor &t, at::ScalarType dtype) {
  return t.is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.layout() == at::kStrided;
}

// 0 (float32) or 1 (float64) if the native kernels take x and W's operands (n outputs) as they are, else -1
int native_case(const Tensor &x, const Tensor &values, const Tensor &crow, const Tensor &col,
                const std::optional<Tensor> &bias, int64_t n, int64_t block) {
  const auto dtype = x.scalar_type();
  const int which = dtype == at::kFloat ? 0 : dtype == at::kDouble ? 1 : -1;
  const bool ok = which >= 0 && vector_bytes > 0 && x.is_cpu() && x.layout() == at::kStrided && n > 0 &&
                  block > 0 && is_operand(values, dtype) && values.dim() == 3 && values.size(1) == block &&
                  values.size(2) == block && is_index(crow) && is_index(col) &&
                  crow.size(0) == (n + block - 1) / block + 1 && col.size(0) == values.size(0) &&
                  (!bias.has_value() || (is_operand(*bias, dtype) && bias->dim() == 1 && bias->size(0) == n));
  return ok ? which : -1;
}

bool rows_of(const Tensor &x, int64_t k) { return x.dim() >= 1 && k > 0 && x.size(-1) == k; }  // x (..., k)

int64_t lanes(const Tensor &x) { return vector_bytes / static_cast<int64_t>(x.element_size()); }

void check(int status) {
  TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "sparsegraph CPU kernel: could not allocate a work buffer");
}

// output positions along one axis, 0 where the (dilated) kernel does not fit: the division floors, as Python's
int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t span = size + 2 * pad - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

Tensor output(const Tensor &x, int64_t n) {  // (..., n) for x (..., k)
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  return at::empty(shape, x.options());
}

Tensor sparse_linear_cpu(const Tensor &x, const Tensor &values, const Tensor &crow, const Tensor &col,
                         const Tensor &crow_t, const Tensor &col_t, const Tensor &perm_t,
                         const std::optional<Tensor> &bias, int64_t n, int64_t k, int64_t block, int64_t dim,
                         c10::string_view impl) {
  const int which = (impl == "auto" || impl == "cpu") && (dim == -1 || dim == x.dim() - 1) && rows_of(x, k)
                        ? native_case(x, values, crow, col, bias, n, block) : -1;
  if (which < 0)
    return SG_OP(Linear, "sparsegraph::sparse_linear_py")
        .call(x, values, crow, col, crow_t, col_t, perm_t, bias, n, k, block, dim, impl);
  const Tensor xc = x.contiguous();  // (..., k)
  Tensor y = output(x, n);           // (..., n)
  const int64_t M = x.numel() / k;
  if (M == 0) return y;
  const Kernels &f = kernels[which];
  const void *b = bias.has_value() ? bias->data_ptr() : nullptr, *w = values.data_ptr();
  const int32_t *cr = crow.data_ptr<int32_t>(), *cl = col.data_ptr<int32_t>();
  const int nt = std::max(1, at::get_num_threads());
  const bool packed = block % lanes(x) == 0;
  int status = 0;
  if (M == 1 || (M < small_m && !packed)) {  // dot products along W's own (out, in) rows, x read as (M, k, 1)
    status = f.cols(M, k, n, 1, block, xc.data_ptr(), w, cr, cl, nullptr, block, 1, b, y.data_ptr(), nt);
  } else if (packed) {  // W's own blocks, transposed by the kernel as it goes
    status = f.rows_packed(M, k, n, block, xc.data_ptr(), k, w, cr, cl, nullptr, 1, b, y.data_ptr(), n, nt);
  } else if (block < transpose_below_block) {  // lanes along M: y^T = W x^T, in chunks of rows
    const Tensor x2 = xc.view({M, k}), y2 = y.view({M, n});
    for (int64_t m0 = 0; m0 < M && status == 0; m0 += transpose_rows) {
      const int64_t mc = std::min(transpose_rows, M - m0);
      const Tensor xt = x2.narrow(0, m0, mc).t().contiguous();  // (k, mc)
      Tensor yt = at::empty({n, mc}, x.options());
      status = f.cols(1, k, n, mc, block, xt.data_ptr(), w, cr, cl, nullptr, block, 1, b, yt.data_ptr(), nt);
      y2.narrow(0, m0, mc).copy_(yt.t());
    }
  } else {  // the rows kernel, each block-row's blocks repacked
    status = f.rows(M, k, n, block, xc.data_ptr(), k, w, cr, cl, nullptr, 1, b, y.data_ptr(), n, nt);
  }
  check(status);
  return y;
}

// sparse_linear_packed(x, values_t, crow, col, bias, n, k, block): W's blocks stored (in, out)
using LinearPacked = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                            const std::optional<Tensor> &, int64_t, int64_t, int64_t);

// the packed rows kernel on W's blocks as given, at any number of rows (as `cpu.linear_packed`)
Tensor sparse_linear_packed_cpu(const Tensor &x, const Tensor &values_t, const Tensor &crow, const Tensor &col,
                                const std::optional<Tensor> &bias, int64_t n, int64_t k, int64_t block) {
  const int which = rows_of(x, k) ? native_case(x, values_t, crow, col, bias, n, block) : -1;
  if (which < 0 || block % lanes(x) != 0)
    return SG_OP(LinearPacked, "sparsegraph::sparse_linear_packed_py").call(x, values_t, crow, col, bias, n, k, block);
  const Tensor xc = x.contiguous();  // (..., k)
  Tensor y = output(x, n);           // (..., n)
  const int64_t M = x.numel() / k;
  if (M == 0) return y;
  const int status = kernels[which].rows_packed(M, k, n, block, xc.data_ptr(), k, values_t.data_ptr(),
                                                crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nullptr, 0,
                                                bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), n,
                                                std::max(1, at::get_num_threads()));
  check(status);
  return y;
}

// inference only: refuses to run where a gradient would be wanted, else on to the CPU kernel
Tensor sparse_linear_packed_autograd(const Tensor &x, const Tensor &values_t, const Tensor &crow, const Tensor &col,
                                     const std::optional<Tensor> &bias, int64_t n, int64_t k, int64_t block) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !(x.requires_grad() || values_t.requires_grad() ||
                                               (bias.has_value() && bias->requires_grad())),
              "sparsegraph::sparse_linear_packed is inference only (no backward): call it under torch.no_grad(), "
              "or use sparsegraph::sparse_linear");
  at::AutoDispatchBelowADInplaceOrView below;
  return SG_OP(LinearPacked, "sparsegraph::sparse_linear_packed").call(x, values_t, crow, col, bias, n, k, block);
}

// sparse_conv2d(x, values, crow, col, crow_t, col_t, perm_t, bias, out_channels, kernel_size, stride,
// padding, dilation, block, impl)
using Conv2d = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                      const Tensor &, const std::optional<Tensor> &, int64_t, at::IntArrayRef, at::IntArrayRef,
                      at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view);

// as `cpu.conv2d`: a 1x1 convolution without padding is the cols kernel on the positions it reads,
// any other the direct kernel; what that does not take goes to the Python body
Tensor sparse_conv2d_cpu(const Tensor &x, const Tensor &values, const Tensor &crow, const Tensor &col,
                         const Tensor &crow_t, const Tensor &col_t, const Tensor &perm_t,
                         const std::optional<Tensor> &bias, int64_t out, at::IntArrayRef kernel,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t block,
                         c10::string_view impl) {
  const bool pairs = kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2;
  const bool positive = pairs && kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 && stride[1] > 0 &&
                        dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0;
  const int which = (impl == "auto" || impl == "cpu") && positive && x.dim() == 4 && x.size(1) > 0
                        ? native_case(x, values, crow, col, bias, out, block) : -1;
  if (which < 0)
    return SG_OP(Conv2d, "sparsegraph::sparse_conv2d_py")
        .call(x, values, crow, col, crow_t, col_t, perm_t, bias, out, kernel, stride, padding, dilation, block, impl);
  const void *b = bias.has_value() ? bias->data_ptr() : nullptr;
  const int32_t *cr = crow.data_ptr<int32_t>(), *cl = col.data_ptr<int32_t>();
  const int nt = std::max(1, at::get_num_threads());
  int status = 0;
  Tensor y;
  if (kernel[0] == 1 && kernel[1] == 1 && padding[0] == 0 && padding[1] == 0) {  // Y (N, out, L) = W X (N, C, L)
    const Tensor xs = x.slice(2, 0, std::nullopt, stride[0]).slice(3, 0, std::nullopt, stride[1]).contiguous();
    const int64_t N = xs.size(0), C = xs.size(1), Ho = xs.size(2), Wo = xs.size(3);
    y = at::empty({N, out, Ho, Wo}, x.options());
    if (y.numel() > 0)
      status = kernels[which].cols(N, C, out, Ho * Wo, block, xs.data_ptr(), values.data_ptr(), cr, cl, nullptr,
                                   block, 1, b, y.data_ptr(), nt);
  } else {
    const Tensor xc = x.contiguous();
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const int64_t Ho = conv_out(H, kernel[0], stride[0], padding[0], dilation[0]);
    const int64_t Wo = conv_out(W, kernel[1], stride[1], padding[1], dilation[1]);
    y = at::empty({N, out, Ho, Wo}, x.options());
    if (y.numel() > 0)
      status = kernels[which].conv2d(N, C, H, W, out, kernel[0], kernel[1], stride[0], stride[1], padding[0],
                                     padding[1], dilation[0], dilation[1], block, xc.data_ptr(), values.data_ptr(),
                                     cr, cl, b, y.data_ptr(), nt);
  }
  check(status);
  return y;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd of CPU tensors, as `_setup_context` / `_backward` in sparse_linear.py (the Python form,
// which other devices run): dX through W^T's structure, dvalues by the SDDMM, dbias = sum of dY.
struct SparseLinearFn : torch::autograd::Function<SparseLinearFn> {
  static Tensor forward(AutogradContext *ctx, const Tensor &x, const Tensor &values, const Tensor &crow,
                        const Tensor &col, const Tensor &crow_t, const Tensor &col_t, const Tensor &perm_t,
                        const std::optional<Tensor> &bias, int64_t n, int64_t k, int64_t block, int64_t dim,
                        c10::string_view impl) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor y = SG_OP(Linear, "sparsegraph::sparse_linear")
                   .call(x, values, crow, col, crow_t, col_t, perm_t, bias, n, k, block, dim, impl);
    ctx->save_for_backward({x, values, crow, col, crow_t, col_t, perm_t});
    ctx->saved_data["sizes"] = std::vector<int64_t>{n, k, block, x.dim() ? (dim % x.dim() + x.dim()) % x.dim() : 0};
    ctx->saved_data["impl"] = std::string(impl);
    ctx->saved_data["bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1], &crow = saved[2], &col = saved[3], &crow_t = saved[4],
                 &col_t = saved[5], &perm_t = saved[6];
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const int64_t n = sizes[0], k = sizes[1], block = sizes[2], d = sizes[3];
    const std::string impl = ctx->saved_data["impl"].toStringRef();
    const Tensor dy = grads[0].contiguous();
    variable_list out(13);  // one per argument: x, values, 5 index tensors, bias, 5 others
    if (ctx->needs_input_grad(0))
      out[0] = SG_OP(Grad, "sparsegraph::sparse_linear_grad_input")
                   .call(dy, values, crow_t, col_t, perm_t, crow, col, n, k, block, d, impl);
    if (ctx->needs_input_grad(1))
      out[1] = SG_OP(Grad, "sparsegraph::sparse_linear_grad_values")
                   .call(dy, x, crow, col, crow_t, col_t, perm_t, n, k, block, d, impl);
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(7)) {
      std::vector<int64_t> dims;
      for (int64_t i = 0; i < dy.dim(); i++)
        if (i != d) dims.push_back(i);
      out[7] = dy.sum(dims);
    }
    return out;
  }
};

Tensor sparse_linear_autograd(const Tensor &x, const Tensor &values, const Tensor &crow, const Tensor &col,
                              const Tensor &crow_t, const Tensor &col_t, const Tensor &perm_t,
                              const std::optional<Tensor> &bias, int64_t n, int64_t k, int64_t block, int64_t dim,
                              c10::string_view impl) {
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || values.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (grad) return SparseLinearFn::apply(x, values, crow, col, crow_t, col_t, perm_t, bias, n, k, block, dim, impl);
  at::AutoDispatchBelowADInplaceOrView below;  // nothing to record: on to the keys below (fake, functional, CPU)
  return SG_OP(Linear, "sparsegraph::sparse_linear")
      .call(x, values, crow, col, crow_t, col_t, perm_t, bias, n, k, block, dim, impl);
}

}  // namespace

// The native library's entry points (sg_rows_packed, sg_rows, sg_cols, sg_conv2d; float32, then
// float64), its vector width in bytes, and cpu.py's path thresholds.
extern "C" void sg_op_init(void **fns, int64_t vbytes, int64_t small_m_, int64_t transpose_below_block_,
                           int64_t transpose_rows_) {
  for (int i = 0; i < 2; i++)
    kernels[i] = {reinterpret_cast<RowsPacked>(fns[4 * i]), reinterpret_cast<RowsPacked>(fns[4 * i + 1]),
                  reinterpret_cast<Cols>(fns[4 * i + 2]), reinterpret_cast<Conv>(fns[4 * i + 3])};
  small_m = small_m_, transpose_below_block = transpose_below_block_, transpose_rows = transpose_rows_;
  vector_bytes = vbytes;
}

TORCH_LIBRARY_IMPL(sparsegraph, CPU, m) {
  m.impl("sparse_linear", TORCH_FN(sparse_linear_cpu));
  m.impl("sparse_linear_packed", TORCH_FN(sparse_linear_packed_cpu));
  m.impl("sparse_conv2d", TORCH_FN(sparse_conv2d_cpu));
}
// (AutogradCPU: the Python autograd kernels stay registered for the Autograd alias, i.e. other devices)
TORCH_LIBRARY_IMPL(sparsegraph, AutogradCPU, m) {
  m.impl("sparse_linear", TORCH_FN(sparse_linear_autograd));
  m.impl("sparse_linear_packed", TORCH_FN(sparse_linear_packed_autograd));
}
