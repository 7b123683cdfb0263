// Python bindings of the fused CPU kernels (tokenreduce/ops/cpu_kernels.py builds this extension).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bipartite_merge_wavg", &bipartite_merge_wavg, "Bipartite soft matching + size-weighted merge (ToMe)",
        pybind11::arg("x"), pybind11::arg("size"), pybind11::arg("metric"), pybind11::arg("r"), pybind11::arg("p"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("ltmp_merge_prune", &ltmp_merge_prune, "LTMP's threshold merge + prune + compaction (inference)",
        pybind11::arg("x"), pybind11::arg("size"), pybind11::arg("sim"), pybind11::arg("importance"),
        pybind11::arg("mask"), pybind11::arg("theta_merge"), pybind11::arg("theta_prune"), pybind11::arg("p"),
        pybind11::arg("multiple"), pybind11::arg("counts") = pybind11::none(), pybind11::arg("packed") = false,
        pybind11::arg("from_keys") = false, pybind11::arg("with_index") = true, pybind11::arg("with_log_size") = false,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("ltmp_similarities", &ltmp_similarities, "LTMP's A-to-B cosine similarities from the (per-head) keys",
        pybind11::arg("keys"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bucketed_attention", &bucketed_attention,
        "a padded batch's attention in length buckets with the received-attention bound (inference)",
        pybind11::arg("qkv"), pybind11::arg("packed"), pybind11::arg("live"), pybind11::arg("bias"),
        pybind11::arg("scale"), pybind11::arg("log_floor"), pybind11::arg("multiple"), pybind11::arg("overhead"),
        pybind11::arg("keys"), pybind11::arg("bound") = true, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("squeeze_tokens", &squeeze_tokens, "TPS's squeeze: host choice + weighted merge + sizes (inference)",
        pybind11::arg("x"), pybind11::arg("size"), pybind11::arg("keep"), pybind11::arg("drop"), pybind11::arg("p"),
        pybind11::arg("temperature"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("window_groups", &window_groups, "ToMe for SD's window matching: group index maps (inference)",
        pybind11::arg("scores"), pybind11::arg("norms"), pybind11::arg("src_pos"), pybind11::arg("dst_pos"),
        pybind11::arg("r"), pybind11::arg("p"), pybind11::arg("n"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("group_mean", &group_mean, "ToMe for SD's merge: the group means of the stream (inference)",
        pybind11::arg("x"), pybind11::arg("rep"), pybind11::arg("src"), pybind11::arg("into"), pybind11::arg("size"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("unmerge_add", &unmerge_add, "ToMe for SD's unmerge: the stream plus its groups' rows (inference)",
        pybind11::arg("x"), pybind11::arg("y"), pybind11::arg("slot"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("token_distances", &token_distances, "BAT's DPC-kNN: pairwise token distances, direct form (inference)",
        pybind11::arg("x"), pybind11::arg("scale"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("dpc_clusters", &dpc_clusters, "BAT's DPC-kNN: density, distance indicator, centres, assignment (inference)",
        pybind11::arg("dist"), pybind11::arg("num_clusters"), pybind11::arg("k"), pybind11::arg("include_self"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cluster_merge", &cluster_merge, "BAT's cluster tokens: importance-weighted means and sizes (inference)",
        pybind11::arg("x"), pybind11::arg("assign"), pybind11::arg("importance"), pybind11::arg("rest"),
        pybind11::arg("size"), pybind11::arg("p"), pybind11::arg("num_clusters"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
