// The sparsek:: operators: schemas, CPU implementations, and the Python module that loads them.
//
// select  the selection alone (used by the KV cache and by tests);
// fwd     selection + attention in one operator, so torch.compile sees one node; it also returns
//         the selection, which the backward reuses;
// bwd     gradients of q, k, v and (soft mode) the scores.
// Fake (meta) kernels are registered from Python (sparsek_hf/_ops.py), autograd in autograd.cpp.
#include <Python.h>
#include <torch/library.h>

#include "sparsek.h"

namespace sparsek {
namespace {

using SelectionTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FwdTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SelectionTuple select_cpu_op(const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid,
                             int64_t num_queries, int64_t budget, int64_t window, int64_t sinks,
                             int64_t block_q, bool soft) {
  check_selection_args(scores, key_valid, num_queries, budget, window, sinks, block_q);
  const Geometry geo = make_geometry(num_queries, scores.size(2), budget, window, sinks, block_q);
  Selection s = select_cpu(scores, key_valid, geo, budget, window, sinks, soft);
  return {s.idx, s.gate, s.count, s.tau, s.nfrac};
}

FwdTuple fwd_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& scores,
                    const c10::optional<at::Tensor>& key_valid, int64_t budget, int64_t window, int64_t sinks,
                    int64_t block_q, double scale, bool soft) {
  check_attention_args(q, k, v, scores, key_valid, budget, window, sinks, block_q);
  const Geometry geo = make_geometry(q.size(2), k.size(2), budget, window, sinks, block_q);
  Selection s = select_cpu(scores, key_valid, geo, budget, window, sinks, soft);
  auto [out, lse] = attention_fwd_cpu(q, k, v, key_valid, s, geo, window, sinks, scale);
  return {out, lse, s.idx, s.gate, s.count, s.tau, s.nfrac};
}

BwdTuple bwd_cpu_op(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& scores,
                    const c10::optional<at::Tensor>& key_valid, const at::Tensor& sel_idx,
                    const at::Tensor& sel_gate, const at::Tensor& sel_count, const at::Tensor& tau,
                    const at::Tensor& nfrac, int64_t window, int64_t sinks, int64_t block_q, double scale,
                    bool soft, bool scores_grad) {
  SPARSEK_CHECK_VALUE(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  const Geometry geo = make_geometry(q.size(2), k.size(2), sel_idx.size(3), window, sinks, block_q);
  SPARSEK_CHECK_VALUE(geo.width == sel_idx.size(3) && geo.num_blocks == sel_idx.size(2),
                    "the selection does not belong to these inputs");
  const Selection s{sel_idx.contiguous(), sel_gate.contiguous(), sel_count.contiguous(), tau.contiguous(),
                    nfrac.contiguous()};
  return attention_bwd_cpu(dout, q, k, v, out, lse, scores, key_valid, s, geo, window, sinks, scale, soft,
                           scores_grad);
}

}  // namespace

TORCH_LIBRARY(sparsek, m) {
  m.def(
      "select(Tensor scores, Tensor? key_valid, int num_queries, int budget, int window, int sinks, int block_q, "
      "bool soft) -> (Tensor sel_idx, Tensor sel_gate, Tensor sel_count, Tensor tau, Tensor nfrac)");
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor scores, Tensor? key_valid, int budget, int window, int sinks, "
      "int block_q, float scale, bool soft) -> (Tensor out, Tensor lse, Tensor sel_idx, Tensor sel_gate, "
      "Tensor sel_count, Tensor tau, Tensor nfrac)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor scores, Tensor? key_valid, "
      "Tensor sel_idx, Tensor sel_gate, Tensor sel_count, Tensor tau, Tensor nfrac, int window, int sinks, "
      "int block_q, float scale, bool soft, bool scores_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dscores)");
}

TORCH_LIBRARY_IMPL(sparsek, CPU, m) {
  m.impl("select", &select_cpu_op);
  m.impl("fwd", &fwd_cpu_op);
  m.impl("bwd", &bwd_cpu_op);
}

}  // namespace sparsek

// Importing sparsek_hf._C registers the operators above with torch.ops.sparsek.
static struct PyModuleDef sparsek_module = {PyModuleDef_HEAD_INIT, "_C", "SparseK compiled kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparsek_module); }
