// Fused CPU kernel: ToMe's bipartite soft matching followed by the size-weighted merge.
//
// The same rule as tokenreduce/ops/matching.py (`bipartite_soft_matching`) and
// tokenreduce/ops/merge.py (`merge_wavg`), in one call instead of ~30 small ATen ops.
// At batch 1 on CPU those small ops, not the arithmetic, are most of a merge's cost.
// Operation order follows the Python path (x·s, sequential adds in edge order, one
// division by the summed size; built without FMA contraction), so the two give the
// same numbers.
//
// Built on first use by tokenreduce/ops/cpu_kernels.py (torch.utils.cpp_extension.load); bound in module.cpp.

#include "kernels.h"
#include "rows.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

using tokenreduce::first_argmax;
using tokenreduce::unit_rows_every_other;

// `a` ranks before `b` in a descending sort that, like torch.sort, puts NaN first.
inline bool ranks_before(float a, float b) {
  if (std::isnan(a)) return !std::isnan(b);
  return a > b;
}

}  // namespace

// x: B×N×C float32; size: B×N×1 float32 or None (all ones); metric: B×N×D float32, or B×H×N×D
// float32 per-head features (any strides with a unit last one) that are averaged over H first, as
// tokenreduce.ops.gather.head_mean does (heads added in order, one division by H): ToMe's keys straight
// from the attention, without a separate mean op.
// Prefix tokens (the first p) are left out of both sets. A′ = positions a0, a0+2, ...,
// B′ = positions b0, b0+2, ... after the prefix. Merges the r A′ tokens with the
// strongest best-cosine edges into their B′ partners.
// Returns (B×(N−r)×C merged x, B×(N−r)×1 summed sizes, B×(N−r) int64 input position of every
// output token's own row, B×N int64 output row every input token ends up in: its own, or its
// destination's when merged away) in the order
// [prefix] ++ [unmerged A′ (sequence order if p > 0, else edge order)] ++ [B′].
std::vector<at::Tensor> bipartite_merge_wavg(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in,
                                             const at::Tensor& metric_in, int64_t r, int64_t p) {
  TORCH_CHECK(x_in.dim() == 3 && (metric_in.dim() == 3 || metric_in.dim() == 4),
              "bipartite_merge_wavg: x must be 3-D and metric 3-D or 4-D");
  TORCH_CHECK(x_in.device().is_cpu() && metric_in.device().is_cpu(), "bipartite_merge_wavg: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && metric_in.scalar_type() == at::kFloat,
              "bipartite_merge_wavg: float32 tensors only");
  const bool per_head = metric_in.dim() == 4;
  // A 3-D metric is one head: B×1×N×D.
  const at::Tensor metric_heads = per_head ? metric_in : metric_in.unsqueeze(1);
  TORCH_CHECK(x_in.size(0) == metric_heads.size(0) && x_in.size(1) == metric_heads.size(2),
              "bipartite_merge_wavg: x and metric must share B and N");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor metric = metric_heads.stride(3) == 1 ? metric_heads : metric_heads.contiguous();
  const int64_t batch = x.size(0), n = x.size(1), channels = x.size(2);
  const int64_t heads = metric.size(1), dim = metric.size(3);
  const int64_t m_image = metric.stride(0), m_head = metric.stride(1), m_token = metric.stride(2);
  TORCH_CHECK(p >= 0 && p <= n, "bipartite_merge_wavg: bad prefix count");
  const int64_t a0 = 2 * ((p + 1) / 2), b0 = 2 * (p / 2) + 1;
  const int64_t na = n > a0 ? (n - a0 + 1) / 2 : 0;
  const int64_t nb = n > b0 ? (n - b0 + 1) / 2 : 0;
  TORCH_CHECK(r > 0 && r <= std::min(na, nb), "bipartite_merge_wavg: r must be in [1, (N - p) // 2]");

  at::Tensor size;
  const bool has_size = size_in.has_value() && size_in->defined();
  if (has_size) {
    size = size_in->contiguous();
    TORCH_CHECK(size.scalar_type() == at::kFloat && size.numel() == batch * n,
                "bipartite_merge_wavg: size must be a B×N×1 float32 tensor");
  }
  const float* x_data = x.data_ptr<float>();
  const float* size_data = has_size ? size.data_ptr<float>() : nullptr;
  const float* metric_data = metric.data_ptr<float>();

  // Normalised metric of A′ and B′, each in its own contiguous buffer, then one BMM.
  at::Tensor a = at::empty({batch, na, dim}, x.options());
  at::Tensor b = at::empty({batch, nb, dim}, x.options());
  float* a_data = a.data_ptr<float>();
  float* b_data = b.data_ptr<float>();
  std::vector<float> scratch(dim);  // a token's head mean (a per-head metric)
  for (int64_t img = 0; img < batch; ++img) {
    const float* image = metric_data + img * m_image;
    unit_rows_every_other(image, m_token, heads, m_head, dim, a0, na, scratch.data(), a_data + img * na * dim);
    unit_rows_every_other(image, m_token, heads, m_head, dim, b0, nb, scratch.data(), b_data + img * nb * dim);
  }
  // B×NA′×NB′ cosine similarities. Under autocast the BMM runs in low precision, as the
  // Python path's does; the scores are read as float32 either way.
  const at::Tensor scores = at::bmm(a, b.transpose(1, 2)).to(at::kFloat).contiguous();
  const float* score_data = scores.data_ptr<float>();

  const int64_t m_out = n - r, num_unm = na - r;
  at::Tensor out = at::empty({batch, m_out, channels}, x.options());
  at::Tensor out_size = at::empty({batch, m_out, 1}, x.options());
  float* out_data = out.data_ptr<float>();
  float* out_size_data = out_size.data_ptr<float>();
  at::Tensor keep = at::empty({batch, m_out}, x.options().dtype(at::kLong));
  int64_t* keep_data = keep.data_ptr<int64_t>();
  at::Tensor remap = at::empty({batch, n}, x.options().dtype(at::kLong));
  int64_t* remap_data = remap.data_ptr<int64_t>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> node_max(na);
    std::vector<int64_t> node_idx(na), order(na);
    std::vector<int64_t> first_source(nb), last_source(nb), next_source(r);
    for (int64_t img = begin; img < end; ++img) {
      // Best partner of every A′ token (first maximum; NaN wins, as in torch.max).
      const float* img_scores = score_data + img * na * nb;
      for (int64_t i = 0; i < na; ++i) {
        const float* row = img_scores + i * nb;
        const int64_t best = first_argmax(row, nb);
        node_max[i] = row[best];
        node_idx[i] = best;
      }
      // Edges strongest first; ties by position (a stable descending argsort).
      std::iota(order.begin(), order.end(), int64_t{0});
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t u, int64_t v) { return ranks_before(node_max[u], node_max[v]); });
      if (p > 0) std::sort(order.begin() + r, order.end());

      const float* img_x = x_data + img * n * channels;
      const float* img_size = has_size ? size_data + img * n : nullptr;
      float* img_out = out_data + img * m_out * channels;
      float* img_out_size = out_size_data + img * m_out;
      int64_t* img_keep = keep_data + img * m_out;
      int64_t* img_remap = remap_data + img * n;
      // The A′ tokens merging into each B′ token, as linked lists in edge order.
      std::fill(first_source.begin(), first_source.end(), int64_t{-1});
      for (int64_t k = 0; k < r; ++k) {
        const int64_t j = node_idx[order[k]];
        next_source[k] = -1;
        if (first_source[j] < 0) {
          first_source[j] = k;
        } else {
          next_source[last_source[j]] = k;
        }
        last_source[j] = k;
      }
      // One pass over the output: x·s, plus the sources' x·s in edge order, over Σ s.
      auto emit = [&](int64_t out_row, int64_t pos, int64_t first_k) {
        const float* src = img_x + pos * channels;
        float* dst = img_out + out_row * channels;
        const float s = img_size != nullptr ? img_size[pos] : 1.f;
        if (img_size != nullptr) {
          for (int64_t c = 0; c < channels; ++c) dst[c] = src[c] * s;
        } else {
          std::copy(src, src + channels, dst);
        }
        float total = s;
        for (int64_t k = first_k; k >= 0; k = next_source[k]) {
          const int64_t merged_pos = a0 + 2 * order[k];
          img_remap[merged_pos] = out_row;
          const float* merged = img_x + merged_pos * channels;
          if (img_size != nullptr) {
            const float merged_size = img_size[merged_pos];
            for (int64_t c = 0; c < channels; ++c) dst[c] += merged[c] * merged_size;
            total += merged_size;
          } else {
            for (int64_t c = 0; c < channels; ++c) dst[c] += merged[c];
            total += 1.f;
          }
        }
        if (img_size != nullptr || first_k >= 0) {
          for (int64_t c = 0; c < channels; ++c) dst[c] /= total;
        }
        img_out_size[out_row] = total;
        img_keep[out_row] = pos;
        img_remap[pos] = out_row;
      };
      for (int64_t t = 0; t < p; ++t) emit(t, t, -1);
      for (int64_t k = 0; k < num_unm; ++k) emit(p + k, a0 + 2 * order[r + k], -1);
      for (int64_t j = 0; j < nb; ++j) emit(p + num_unm + j, b0 + 2 * j, first_source[j]);
    }
  });
  return {out, out_size, keep, remap};
}
