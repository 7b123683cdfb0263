// The fused CPU kernels of tokenreduce (bound to Python in module.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

// ToMe: bipartite soft matching + size-weighted merge (bipartite_merge.cpp).
std::vector<at::Tensor> bipartite_merge_wavg(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in,
                                             const at::Tensor& metric_in, int64_t r, int64_t p);

// LTMP's inference step: threshold merge, threshold prune, compaction (ltmp_merge_prune.cpp).
std::vector<at::Tensor> ltmp_merge_prune(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in,
                                         const at::Tensor& sim_in, const at::Tensor& importance_in,
                                         const c10::optional<at::Tensor>& mask_in, double theta_merge,
                                         double theta_prune, int64_t p);

// TPS's squeeze, inference form: host choice, weighted merge, sizes (squeeze.cpp).
std::vector<at::Tensor> squeeze_tokens(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in,
                                       const at::Tensor& keep_in, const at::Tensor& drop_in, int64_t p,
                                       double temperature);
