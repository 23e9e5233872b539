// Autograd of sparsek::fwd, in C++ for every backend: the forward saves what sparsek::bwd needs
// (the inputs, out, lse and the selection) and the backward calls it. Only out carries a gradient.
// It replaces a torch.library.register_autograd formula, whose Python wrapper cost about 0.1 ms
// per call before the first kernel launch (the GPU waits for it in a fwd+bwd); torch.compile still
// sees one sparsek::fwd node, and the fake kernels stay in sparsek_hf/_ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace sparsek {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using FwdTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FwdSignature = FwdTuple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t, double, bool);
using BwdSignature = BwdTuple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, int64_t, int64_t, int64_t, double, bool, bool);

const c10::TypedOperatorHandle<FwdSignature>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sparsek::fwd", "").typed<FwdSignature>();
  return op;
}

const c10::TypedOperatorHandle<BwdSignature>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sparsek::bwd", "").typed<BwdSignature>();
  return op;
}

class SparseKFunction : public torch::autograd::Function<SparseKFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid, int64_t budget,
                               int64_t window, int64_t sinks, int64_t block_q, double scale, bool soft) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse, idx, gate, count, tau, nfrac] =
        fwd_op().call(q, k, v, scores, key_valid, budget, window, sinks, block_q, scale, soft);
    ctx->save_for_backward({q, k, v, scores, key_valid.value_or(at::Tensor()), out, lse, idx, gate, count, tau, nfrac});
    ctx->saved_data["window"] = window;
    ctx->saved_data["sinks"] = sinks;
    ctx->saved_data["block_q"] = block_q;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["soft"] = soft;
    ctx->mark_non_differentiable({lse, idx, gate, count, tau, nfrac});
    // No zero-filled gradients for the six outputs that carry none.
    ctx->set_materialize_grads(false);
    return {out, lse, idx, gate, count, tau, nfrac};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &scores = saved[3], &out = saved[5];
    const c10::optional<at::Tensor> key_valid =
        saved[4].defined() ? c10::optional<at::Tensor>(saved[4]) : c10::optional<at::Tensor>();
    const at::Tensor dout = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(out);
    auto [dq, dk, dv, dscores] = bwd_op().call(
        dout, q, k, v, out, saved[6], scores, key_valid, saved[7], saved[8], saved[9], saved[10], saved[11],
        ctx->saved_data["window"].toInt(), ctx->saved_data["sinks"].toInt(), ctx->saved_data["block_q"].toInt(),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["soft"].toBool(), ctx->needs_input_grad(3));
    return {dq, dk, dv, dscores, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

FwdTuple fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& scores,
                      const c10::optional<at::Tensor>& key_valid, int64_t budget, int64_t window, int64_t sinks,
                      int64_t block_q, double scale, bool soft) {
  const variable_list r =
      SparseKFunction::apply(q, k, v, scores, key_valid, budget, window, sinks, block_q, scale, soft);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsek, Autograd, m) { m.impl("fwd", &fwd_autograd); }

}  // namespace sparsek
