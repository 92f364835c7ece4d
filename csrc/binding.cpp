// Torch binding of the MoR kernels: the ei_kernels_cuda::mor_fwd / mor_bwd ops.
//
// Validates every input (device, dtype, shape, contiguity) with a message naming the argument,
// allocates outputs and workspaces through the caching allocator and launches on the current
// stream with no host synchronisation, so the ops can be captured in CUDA graphs. The fake
// (meta) implementations for torch.compile live in ei_kernels/cuda_extension.py.
#include <Python.h>  // first, as Python requires

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "mor_kernels.h"
#include "sm90_gemm.h"

namespace {

using at::Tensor;

constexpr const char* kFwd = "ei_kernels_cuda::mor_fwd";
constexpr const char* kBwd = "ei_kernels_cuda::mor_bwd";

ei::DType kernel_dtype(const char* op, const Tensor& x) {
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, op, ": x has dtype ",
              st, "; the CUDA kernels take float16, bfloat16 or float32 (float64 runs on the "
              "torch backend)");
  return st == at::kHalf ? ei::DType::kHalf
                         : st == at::kBFloat16 ? ei::DType::kBFloat16 : ei::DType::kFloat;
}

void check_x(const char* op, const char* name, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got ", name, " on ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D [tokens, features], got shape ",
              x.sizes());
  TORCH_CHECK(x.size(0) <= std::numeric_limits<int32_t>::max(), op, ": ", name, " has ",
              x.size(0), " rows; at most 2^31 - 1 tokens per call");
}

void check_operand(const char* op, const char* name, const Tensor& t, const Tensor& x,
                   at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              ", expected ", x.device(), " (where x is)");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " has shape ", t.sizes(),
              ", expected ", at::IntArrayRef(shape));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous (the cuda backend's forward/backward make it so)");
}

// Whether the big GEMMs may take the sm_90a kernels (some of their paths read extra workspaces).
bool sm90_enabled(ei::DType dtype, const Tensor& x) {
  bool enabled = false;
  C10_CUDA_CHECK(ei::sm90_gemm_enabled(dtype, x.get_device(), &enabled));
  return enabled;
}

ei::MorDims make_dims(const char* op, const Tensor& x, int64_t out_features, at::IntArrayRef ranks,
                      at::ArrayRef<double> scalings, bool bypass, int64_t groups, bool router) {
  const int64_t branches = int64_t(ranks.size());
  TORCH_CHECK(branches >= 1 && branches <= ei::kMaxBranches, op, ": expected 1 to ",
              ei::kMaxBranches, " branches, got ranks=", ranks);
  TORCH_CHECK(int64_t(scalings.size()) == branches, op, ": expected one scaling per branch (",
              branches, "), got ", scalings.size());
  TORCH_CHECK(groups >= 1 && out_features % groups == 0, op, ": groups=", groups,
              " must be positive and divide out_features=", out_features);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(x.size(1) <= kIntMax && out_features <= kIntMax, op,
              ": in_features and out_features must be below 2^31");

  ei::MorDims d{};
  d.tokens = x.size(0);
  d.in_features = int(x.size(1));
  d.out_features = int(out_features);
  d.groups = int(groups);
  d.branches = int(branches);
  d.router = router;
  d.bypass = router && bypass;  // without a router there is no bypass probability
  d.logits = router ? d.branches + int(d.bypass) : 0;
  int64_t start = 0;
  for (int64_t k = 0; k < branches; ++k) {
    TORCH_CHECK(ranks[k] > 0, op, ": ranks must be positive, got ", ranks);
    d.start[k] = int(start);
    start += ranks[k];
    TORCH_CHECK(start <= kIntMax / groups, op, ": sum(ranks) * groups too large");
    d.scale[k] = float(scalings[k]);
  }
  d.start[branches] = int(start);
  d.rank = int(start);
  return d;
}

// -> (y, probs, shrink): shrink = [u | l] [N, S] in fp32, the forward's own workspace. A caller
// that keeps it (within its memory budget) passes it to mor_bwd, which then skips recomputing
// u = x A_cat^T: one read of x and one launch fewer.
std::tuple<Tensor, Tensor, Tensor> mor_fwd(const Tensor& x, const Tensor& weight,
                                   const std::optional<Tensor>& bias, const Tensor& lora_a,
                                   const Tensor& lora_b,
                                   const std::optional<Tensor>& router_weight,
                                   const std::optional<Tensor>& router_bias,
                                   at::IntArrayRef ranks, at::ArrayRef<double> scalings,
                                   bool bypass, int64_t groups) {
  check_x(kFwd, "x", x);
  const ei::DType dtype = kernel_dtype(kFwd, x);
  TORCH_CHECK(weight.dim() == 2, kFwd, ": weight must be 2-D [out, in], got shape ",
              weight.sizes());
  const bool router = router_weight.has_value();
  TORCH_CHECK(router || !router_bias.has_value(), kFwd,
              ": router_bias given without router_weight");
  const ei::MorDims d =
      make_dims(kFwd, x, weight.size(0), ranks, scalings, bypass, groups, router);
  const int64_t N = d.tokens, K = d.in_features, O = d.out_features;
  const int64_t gr = int64_t(d.groups) * d.rank, gl = int64_t(d.groups) * d.logits;
  const at::ScalarType st = x.scalar_type();
  check_operand(kFwd, "x", x, x, st, {N, K});
  check_operand(kFwd, "weight", weight, x, st, {O, K});
  if (bias) check_operand(kFwd, "bias", *bias, x, st, {O});
  check_operand(kFwd, "lora_a", lora_a, x, st, {gr, K});
  check_operand(kFwd, "lora_b", lora_b, x, st, {O, d.rank});
  if (router) check_operand(kFwd, "router_weight", *router_weight, x, st, {gl, K});
  if (router_bias) check_operand(kFwd, "router_bias", *router_bias, x, st, {gl});

  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty({N, O}, x.options());
  Tensor probs = at::empty({N, gl}, f32);
  Tensor shrink = at::empty({N, d.shrink_width()}, f32);
  const bool sm90 = sm90_enabled(dtype, x);

  ei::MorForwardArgs args{};
  args.x = x.data_ptr();
  args.weight = weight.data_ptr();
  args.bias = bias ? bias->data_ptr() : nullptr;
  args.lora_a = lora_a.data_ptr();
  args.lora_b = lora_b.data_ptr();
  args.router_weight = router ? router_weight->data_ptr() : nullptr;
  args.router_bias = router_bias ? router_bias->data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.probs = probs.data_ptr<float>();
  args.shrink = shrink.data_ptr<float>();
  args.sm90 = sm90;
  // The routed sm_90a forward keeps z and B_cat in shared memory; the other paths need them.
  args.sm90_routed = sm90 && ei::sm90_routed_enabled() && ei::sm90_routed_accepts(dtype, d, args);
  Tensor z, lora_b_ext;
  if (!args.sm90_routed) {
    z = at::empty({N, d.rank_ld()}, x.options());
    args.z = z.data_ptr();
    if (sm90) {
      lora_b_ext = at::empty({O, d.rank_ld()}, x.options());
      args.lora_b_ext = lora_b_ext.data_ptr();
    }
  }
  C10_CUDA_CHECK(ei::mor_forward(dtype, d, args, c10::cuda::getCurrentCUDAStream()));
  return {y, probs, shrink};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mor_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& probs, const Tensor& weight,
    const Tensor& lora_a, const Tensor& lora_b, const std::optional<Tensor>& router_weight,
    const std::optional<Tensor>& shrink, at::IntArrayRef ranks, at::ArrayRef<double> scalings,
    bool bypass, int64_t groups, bool compute_dx) {
  check_x(kBwd, "x", x);
  const ei::DType dtype = kernel_dtype(kBwd, x);
  TORCH_CHECK(weight.dim() == 2, kBwd, ": weight must be 2-D [out, in], got shape ",
              weight.sizes());
  const bool router = router_weight.has_value();
  const ei::MorDims d =
      make_dims(kBwd, x, weight.size(0), ranks, scalings, bypass, groups, router);
  const int64_t N = d.tokens, K = d.in_features, O = d.out_features;
  const int64_t gr = int64_t(d.groups) * d.rank, gl = int64_t(d.groups) * d.logits;
  const int64_t S = d.shrink_width();
  const at::ScalarType st = x.scalar_type();
  check_operand(kBwd, "dy", dy, x, st, {N, O});
  check_operand(kBwd, "x", x, x, st, {N, K});
  check_operand(kBwd, "probs", probs, x, at::kFloat, {N, gl});
  check_operand(kBwd, "weight", weight, x, st, {O, K});
  check_operand(kBwd, "lora_a", lora_a, x, st, {gr, K});
  check_operand(kBwd, "lora_b", lora_b, x, st, {O, d.rank});
  if (router) check_operand(kBwd, "router_weight", *router_weight, x, st, {gl, K});
  if (shrink) check_operand(kBwd, "shrink", *shrink, x, at::kFloat, {N, S});

  const c10::cuda::CUDAGuard guard(x.device());
  ei::ReductionPlan plan{};
  C10_CUDA_CHECK(ei::plan_reductions(d, x.get_device(), &plan));
  const auto opts = x.options();
  const auto f32 = opts.dtype(at::kFloat);
  Tensor dx = at::empty({compute_dx ? N : 0, K}, opts);
  Tensor d_lora_a = at::empty({gr, K}, opts);
  Tensor d_lora_b = at::empty({O, d.rank}, opts);
  Tensor d_router_weight = at::empty({gl, K}, opts);
  Tensor d_router_bias = at::empty({gl}, opts);
  Tensor u = shrink ? *shrink : at::empty({N, gr}, f32);  // the forward's [u | l], if kept
  const bool sm90 = compute_dx && sm90_enabled(dtype, x);  // only dx takes it

  ei::MorBackwardArgs args{};
  args.dy = dy.data_ptr();
  args.x = x.data_ptr();
  args.probs = probs.data_ptr<float>();
  args.weight = weight.data_ptr();
  args.lora_a = lora_a.data_ptr();
  args.lora_b = lora_b.data_ptr();
  args.router_weight = router ? router_weight->data_ptr() : nullptr;
  args.dx = compute_dx ? dx.data_ptr() : nullptr;
  args.d_lora_a = d_lora_a.data_ptr();
  args.d_lora_b = d_lora_b.data_ptr();
  args.d_router_weight = d_router_weight.data_ptr();
  args.d_router_bias = d_router_bias.data_ptr();
  args.u = u.data_ptr<float>();
  args.u_ld = u.size(1);
  args.u_workspace = shrink ? nullptr : u.data_ptr<float>();
  args.sm90 = sm90;
  // The routed sm_90a dx keeps g and z on chip and writes the partials of dB, dc and (unless
  // "unfolded") d[A_cat; R]: dc's one per row tile, the others' per slot (sm90_gemm.h); the
  // other paths need g and z, and the unrouted sm_90a dx [A_cat; R] stacked.
  args.sm90_routed = sm90 && ei::sm90_routed_enabled() &&
                     ei::sm90_routed_dgrad_accepts(dtype, d, args);
  args.sm90_folds_x = args.sm90_routed && ei::sm90_routed_folds_x();
  args.dependent_sum = args.sm90_folds_x && ei::dependent_launch_enabled();
  args.dependent_dgrad =
      args.sm90_routed && args.u_workspace != nullptr && ei::dependent_launch_enabled();
  Tensor g, z, d_shrink, shrink_weight;
  if (!args.sm90_folds_x) {
    d_shrink = at::empty({N, d.shrink_ld()}, opts);
    args.d_shrink = d_shrink.data_ptr();
  }
  if (args.sm90_routed) {
    int64_t slots = 0;
    C10_CUDA_CHECK(ei::sm90_routed_dgrad_slots(d, &slots));
    plan.dl_splits = int(ei::sm90_routed_dgrad_row_tiles(N));
    plan.lora_b_splits = int(slots);
    if (args.sm90_folds_x) plan.shrink_splits = int(slots);
  } else {
    g = at::empty({N, gr}, f32);
    args.g = g.data_ptr<float>();
    z = at::empty({N, d.rank_ld()}, opts);
    args.z = z.data_ptr();
    if (sm90 && router) {
      shrink_weight = at::empty({S, K}, opts);
      args.shrink_weight = shrink_weight.data_ptr();
    }
  }
  Tensor lora_b_partial = at::empty({plan.lora_b_splits, O, d.rank}, f32);
  args.lora_b_partial = lora_b_partial.data_ptr<float>();
  Tensor dl_partial = at::empty({plan.dl_splits, gl}, f32);
  args.dl_partial = dl_partial.data_ptr<float>();
  Tensor shrink_partial = at::empty({plan.shrink_splits, S, K}, f32);
  args.shrink_partial = shrink_partial.data_ptr<float>();
  C10_CUDA_CHECK(ei::mor_backward(dtype, d, plan, args, c10::cuda::getCurrentCUDAStream()));
  return {dx, d_lora_a, d_lora_b, d_router_weight, d_router_bias};
}

}  // namespace

TORCH_LIBRARY(ei_kernels_cuda, m) {
  m.def(
      "mor_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor? router_weight, Tensor? router_bias, int[] ranks, float[] scalings, bool bypass, "
      "int groups) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mor_bwd(Tensor dy, Tensor x, Tensor probs, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor? router_weight, Tensor? shrink, int[] ranks, float[] scalings, bool bypass, "
      "int groups, bool compute_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Whether this library holds the sm_90a GEMM (ei_kernels.cuda_extension_info reports it).
  m.def("sm90_gemm_built() -> bool", [] { return ei::sm90_gemm_built(); });
}

TORCH_LIBRARY_IMPL(ei_kernels_cuda, CUDA, m) {
  m.impl("mor_fwd", &mor_fwd);
  m.impl("mor_bwd", &mor_bwd);
}

// CPU tensors reach the same functions, whose first check says that CUDA tensors are needed
// (rather than the dispatcher's generic "could not run ... with arguments from the CPU backend").
TORCH_LIBRARY_IMPL(ei_kernels_cuda, CPU, m) {
  m.impl("mor_fwd", &mor_fwd);
  m.impl("mor_bwd", &mor_bwd);
}

// `import ei_kernels._C` loads this library, which runs the registrations above; the module
// itself has no Python attributes.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                               nullptr,               nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
