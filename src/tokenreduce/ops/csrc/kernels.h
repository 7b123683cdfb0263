// The fused CPU kernels of tokenreduce (bound to Python in module.cpp).
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

// ToMe: bipartite soft matching + size-weighted merge (bipartite_merge.cpp).
std::vector<at::Tensor> bipartite_merge_wavg(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in,
                                             const at::Tensor& metric_in, int64_t r, int64_t p);

// LTMP's inference step: threshold merge, threshold prune, compaction (ltmp_merge_prune.cpp).
// (x, sizes, live mask or undefined, input positions (or undefined), live counts and live rows (packed only, else
// undefined), log sizes (or undefined)).
using LtmpStep = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
LtmpStep ltmp_merge_prune(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in, const at::Tensor& sim_in,
                          const c10::optional<at::Tensor>& importance_in, const c10::optional<at::Tensor>& mask_in,
                          double theta_merge, double theta_prune, int64_t p, int64_t multiple,
                          const c10::optional<at::Tensor>& counts_in, bool packed_out, bool from_keys,
                          bool with_index, bool with_log_size);
// LTMP's cosine similarities of the even to the odd positions, from the (per-head) keys.
at::Tensor ltmp_similarities(const at::Tensor& keys_in);

// A padded batch's attention in length buckets with the received-attention bound (bucketed_attention.cpp).
// (outputs, received attention, certified images, head-mean keys, bucket lengths).
using BucketedAttention = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
BucketedAttention bucketed_attention(const at::Tensor& qkv_in, const at::Tensor& packed_in, const at::Tensor& live_in,
                                     const c10::optional<at::Tensor>& bias_in, double scale, double log_floor,
                                     int64_t multiple, double overhead, bool keys, bool bound);

// TPS's squeeze, inference form: host choice, weighted merge, sizes (squeeze.cpp).
std::vector<at::Tensor> squeeze_tokens(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in,
                                       const at::Tensor& keep_in, const at::Tensor& drop_in, int64_t p,
                                       double temperature);

// ToMe for SD: the group index maps of a window matching, after the similarity product (window_groups.cpp).
std::vector<at::Tensor> window_groups(const at::Tensor& scores_in, const at::Tensor& norms_in,
                                      const at::Tensor& src_pos_in, const at::Tensor& dst_pos_in, int64_t r,
                                      int64_t p, int64_t n);

// ToMe for SD: the stream merged into group means, and group rows added back to the stream (group_rows.cpp).
at::Tensor group_mean(const at::Tensor& x_in, const at::Tensor& rep_in, const at::Tensor& src_in,
                      const at::Tensor& into_in, const at::Tensor& size_in);
at::Tensor unmerge_add(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& slot_in);

// BAT's DPC-kNN: the tokens' pairwise distances, the clusters they give, and the cluster tokens (dpc_knn.cpp).
at::Tensor token_distances(const at::Tensor& x_in, double scale);
std::vector<at::Tensor> dpc_clusters(const at::Tensor& dist_in, int64_t num_clusters, int64_t k, bool include_self);
std::vector<at::Tensor> cluster_merge(const at::Tensor& x_in, const at::Tensor& assign_in, const at::Tensor& importance_in,
                                      const at::Tensor& rest_in, const c10::optional<at::Tensor>& size_in, int64_t p,
                                      int64_t num_clusters);
