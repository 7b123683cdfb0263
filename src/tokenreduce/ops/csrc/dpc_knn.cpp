// Fused CPU kernels: BAT's DPC-kNN clustering of tokens (tokenreduce/ops/cluster.py, `dpc_knn`) in two calls.
//
// `token_distances`: the B×M×M Euclidean distances of every image's tokens, direct form. Each pair's squared
// distance is summed over the channels in 16 partial sums (channel c goes to sum c mod 16), which are then
// added in a fixed tree; only i < j is computed and mirrored, so the result is exactly symmetric with a zero
// diagonal, as torch.cdist's direct form is. The summation order is this file's own: the distances agree with
// torch.cdist to float rounding (exactly where every partial sum is exact, e.g. small integer features).
//
// `dpc_clusters`: everything after the distances, with the Python path's operations in its order, so the same
// distances give the same clusters bit for bit: kNN log density -(Σ d² over the k nearest, ascending, summed
// in that order) / k; the rank order (denser first, a density tie to the lower position); δ, the distance to
// the nearest token ranked above (the top-ranked token: its farthest one); the score log ρ + log δ, whose log
// is ATen's (at::log, so the rounding is the Python path's); the C centres in a stable descending sort of
// the score; every token to its nearest centre (the first of equals), every centre to itself.
//
// `cluster_merge`: BAT's cluster tokens from the clusters (tokenreduce/ops/cluster.py, `cluster_merge`): every
// cluster's importance-weighted mean and its size, each sum accumulated from zero in member order as index_add_
// does, then divided by the weight sum (at least the smallest normal float): bit for bit the Python path.
//
// At batch 1 the Python path is about 50 small ATen ops and one slow cdist per clustering; these are three
// calls. Built on first use by tokenreduce/ops/cpu_kernels.py (torch.utils.cpp_extension.load); bound in
// module.cpp.

#include "kernels.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

// Σ_c (a_c − b_c)² over `dim` channels: channel c into partial sum c mod 16, then a fixed pairwise tree.
inline float squared_distance(const float* a, const float* b, int64_t dim) {
  float lane[kLanes] = {0.f};
  int64_t c = 0;
  for (; c + kLanes <= dim; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float diff = a[c + l] - b[c + l];
      lane[l] += diff * diff;
    }
  }
  for (int64_t l = 0; c < dim; ++c, ++l) {
    const float diff = a[c] - b[c];
    lane[l] += diff * diff;
  }
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lane[l] += lane[l + width];
  }
  return lane[0];
}

// a > b in torch's descending order, where a NaN is the largest value.
inline bool greater(float a, float b) { return (std::isnan(a) && !std::isnan(b)) || a > b; }

}  // namespace

// x: B×M×C float32; scale: the divisor of every distance (√C, or 1 for the raw distance).
// Returns B×M×M float32 distances ‖x_i − x_j‖ / scale.
at::Tensor token_distances(const at::Tensor& x_in, double scale) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "token_distances: x must be a B×M×C float32 CPU tensor");
  TORCH_CHECK(scale > 0.0, "token_distances: the scale must be > 0");
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), m = x.size(1), dim = x.size(2);
  at::Tensor dist = at::empty({batch, m, m}, x.options());
  const float* x_data = x.data_ptr<float>();
  float* dist_data = dist.data_ptr<float>();
  const float divisor = static_cast<float>(scale);
  const bool divide = divisor != 1.f;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* rows = x_data + b * m * dim;
      float* out = dist_data + b * m * m;
      for (int64_t i = 0; i < m; ++i) {
        out[i * m + i] = 0.f;
        for (int64_t j = i + 1; j < m; ++j) {
          float d = std::sqrt(squared_distance(rows + i * dim, rows + j * dim, dim));
          if (divide) d = d / divisor;
          out[i * m + j] = d;
          out[j * m + i] = d;
        }
      }
    }
  });
  return dist;
}

// dist: B×M×M float32 distances (M ≥ 1); num_clusters: C in [1, M]; k: neighbours of the density (capped at M − 1,
// or at M with include_self). Returns (B×M int64 cluster of every token, B×C int64 centre positions in
// decreasing score order).
std::vector<at::Tensor> dpc_clusters(const at::Tensor& dist_in, int64_t num_clusters, int64_t k, bool include_self) {
  TORCH_CHECK(dist_in.dim() == 3 && dist_in.size(1) == dist_in.size(2) && dist_in.device().is_cpu() &&
                  dist_in.scalar_type() == at::kFloat,
              "dpc_clusters: dist must be a B×M×M float32 CPU tensor");
  const at::Tensor dist = dist_in.contiguous();
  const int64_t batch = dist.size(0), m = dist.size(1);
  TORCH_CHECK(m >= 1, "dpc_clusters: no tokens to cluster");
  TORCH_CHECK(num_clusters >= 1 && num_clusters <= m, "dpc_clusters: num_clusters must be in [1, M]");
  TORCH_CHECK(k >= 0, "dpc_clusters: k must be >= 0");
  const int64_t neighbours = std::min(k, include_self ? m : m - 1);
  const float* dist_data = dist.data_ptr<float>();
  at::Tensor log_density = at::empty({batch, m}, dist.options());
  at::Tensor delta = at::empty({batch, m}, dist.options());
  float* density_data = log_density.data_ptr<float>();
  float* delta_data = delta.data_ptr<float>();

  // log ρ and δ of every token
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(m);
    for (int64_t b = begin; b < end; ++b) {
      const float* d = dist_data + b * m * m;
      float* density = density_data + b * m;
      for (int64_t i = 0; i < m; ++i) {
        if (neighbours <= 0) {
          density[i] = 0.f;
          continue;
        }
        std::copy(d + i * m, d + (i + 1) * m, row.begin());
        if (!include_self) row[i] = std::numeric_limits<float>::infinity();
        std::partial_sort(row.begin(), row.begin() + neighbours, row.end(),
                          [](float a, float c) { return greater(c, a); });
        float total = row[0] * row[0];
        for (int64_t j = 1; j < neighbours; ++j) total = total + row[j] * row[j];
        density[i] = -(total / static_cast<float>(neighbours));
      }
      for (int64_t i = 0; i < m; ++i) {
        const float* di = d + i * m;
        float nearest_above = std::numeric_limits<float>::infinity(), farthest = di[0];
        bool above_any = false;
        for (int64_t j = 0; j < m; ++j) {
          if (greater(di[j], farthest)) farthest = di[j];
          const bool above = density[j] > density[i] || (density[j] == density[i] && j < i);
          if (!above) continue;
          above_any = true;
          if (greater(nearest_above, di[j])) nearest_above = di[j];
        }
        delta_data[b * m + i] = above_any ? nearest_above : farthest;
      }
    }
  });

  const at::Tensor score = at::add(log_density, at::log(delta));  // log(ρ·δ), rounded as the Python path
  const float* score_data = score.data_ptr<float>();
  at::Tensor assign = at::empty({batch, m}, dist.options().dtype(at::kLong));
  at::Tensor centres = at::empty({batch, num_clusters}, dist.options().dtype(at::kLong));
  int64_t* assign_data = assign.data_ptr<int64_t>();
  int64_t* centre_data = centres.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(m);
    for (int64_t b = begin; b < end; ++b) {
      const float* s = score_data + b * m;
      const float* d = dist_data + b * m * m;
      std::iota(order.begin(), order.end(), int64_t{0});
      std::stable_sort(order.begin(), order.end(), [s](int64_t a, int64_t c) { return greater(s[a], s[c]); });
      int64_t* centre = centre_data + b * num_clusters;
      std::copy(order.begin(), order.begin() + num_clusters, centre);
      int64_t* out = assign_data + b * m;
      for (int64_t i = 0; i < m; ++i) {
        int64_t best = 0;
        float best_distance = d[i * m + centre[0]];
        for (int64_t c = 1; c < num_clusters; ++c) {
          const float v = d[i * m + centre[c]];
          if (std::isnan(best_distance)) break;  // torch.argmin: the first NaN is the minimum
          if (v < best_distance || std::isnan(v)) {
            best = c;
            best_distance = v;
          }
        }
        out[i] = best;
      }
      for (int64_t c = 0; c < num_clusters; ++c) out[centre[c]] = c;
    }
  });
  return {assign, centres};
}

// x: B×M×C float32 tokens to merge; assign: B×M int64 clusters in [0, C); importance: B×P float32 weights of the
// patch tokens, read at `rest` (B×M int64 patch positions of the tokens); size: B×N×1 float32 sizes of the whole
// stream or None (all ones), read at p + rest. Returns (B×C×C' float32 weighted means, B×C×1 float32 sizes).
std::vector<at::Tensor> cluster_merge(const at::Tensor& x_in, const at::Tensor& assign_in, const at::Tensor& importance_in,
                                      const at::Tensor& rest_in, const c10::optional<at::Tensor>& size_in, int64_t p,
                                      int64_t num_clusters) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "cluster_merge: x must be a B×M×C float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor assign = assign_in.contiguous();
  const at::Tensor importance = importance_in.contiguous();
  const at::Tensor rest = rest_in.contiguous();
  const int64_t batch = x.size(0), m = x.size(1), channels = x.size(2);
  TORCH_CHECK(assign.scalar_type() == at::kLong && rest.scalar_type() == at::kLong && assign.dim() == 2 &&
                  rest.dim() == 2 && assign.size(0) == batch && assign.size(1) == m && rest.size(0) == batch &&
                  rest.size(1) == m,
              "cluster_merge: assign and rest must be B×M int64 tensors");
  TORCH_CHECK(importance.scalar_type() == at::kFloat && importance.dim() == 2 && importance.size(0) == batch,
              "cluster_merge: importance must be a B×P float32 tensor");
  TORCH_CHECK(num_clusters >= 1 && p >= 0, "cluster_merge: bad cluster or prefix count");
  const int64_t patches = importance.size(1);
  at::Tensor size;
  const bool has_size = size_in.has_value() && size_in->defined();
  if (has_size) {
    size = size_in->contiguous();
    TORCH_CHECK(size.scalar_type() == at::kFloat && size.dim() == 3 && size.size(0) == batch &&
                    size.size(1) == p + patches && size.size(2) == 1,
                "cluster_merge: size must be a B×N×1 float32 tensor");
  }
  const float* x_data = x.data_ptr<float>();
  const int64_t* assign_data = assign.data_ptr<int64_t>();
  const float* importance_data = importance.data_ptr<float>();
  const int64_t* rest_data = rest.data_ptr<int64_t>();
  const float* size_data = has_size ? size.data_ptr<float>() : nullptr;
  at::Tensor merged = at::zeros({batch, num_clusters, channels}, x.options());
  at::Tensor merged_size = at::zeros({batch, num_clusters, 1}, x.options());
  float* merged_data = merged.data_ptr<float>();
  float* merged_size_data = merged_size.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weight_sum(num_clusters);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(weight_sum.begin(), weight_sum.end(), 0.f);
      float* out = merged_data + b * num_clusters * channels;
      float* out_size = merged_size_data + b * num_clusters;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t g = assign_data[b * m + i];
        const int64_t position = rest_data[b * m + i];
        TORCH_CHECK(g >= 0 && g < num_clusters && position >= 0 && position < patches,
                    "cluster_merge: a cluster or position out of range");
        const float w = importance_data[b * patches + position];
        const float* row = x_data + (b * m + i) * channels;
        float* target = out + g * channels;
        for (int64_t c = 0; c < channels; ++c) target[c] = target[c] + w * row[c];
        weight_sum[g] = weight_sum[g] + w;
        out_size[g] = out_size[g] + (has_size ? size_data[b * (p + patches) + p + position] : 1.f);
      }
      for (int64_t g = 0; g < num_clusters; ++g) {
        const float denominator = std::max(weight_sum[g], std::numeric_limits<float>::min());
        float* target = out + g * channels;
        for (int64_t c = 0; c < channels; ++c) target[c] = target[c] / denominator;
      }
    }
  });
  return {merged, merged_size};
}
