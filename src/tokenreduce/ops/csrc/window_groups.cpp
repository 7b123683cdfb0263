// Fused CPU kernel: the index maps of ToMe for SD's window matching in one call.
//
// The rule of tokenreduce/ops/unmerge.py (`window_groups`) after the similarity product: every source's
// best destination is its first maximum over the destinations; its score is that maximum divided by
// max(|source|, eps); the sources are ranked by score, descending and stable (ties keep source order),
// and the first r join their destinations. The outputs are the group index maps. The scores and the
// norms come from PyTorch, and max, division and a stable sort are exact, so the maps equal the Python
// path's bit for bit. At batch 1 on CPU the ~60 small ATen ops of that path cost more than the work.
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

// scores: B×S×D float32 products of the sources with the unit destinations; norms: B×S float32 source
// norms; src_pos: S and dst_pos: D int64 stream positions (after the p prefix tokens); r: sources merged
// (0 <= r <= S); n: stream tokens.
// Returns (slot B×N, rep B×M, merged_pos B×r, into B×r, size B×M×1 float32), M = p + S − r + D: the
// merged tokens are the prefix, the sources left alone (in rank order), then the destinations.
std::vector<at::Tensor> window_groups(const at::Tensor& scores_in, const at::Tensor& norms_in,
                                      const at::Tensor& src_pos_in, const at::Tensor& dst_pos_in, int64_t r,
                                      int64_t p, int64_t n) {
  TORCH_CHECK(scores_in.dim() == 3 && scores_in.device().is_cpu() && scores_in.scalar_type() == at::kFloat,
              "window_groups: scores must be a B×S×D float32 CPU tensor");
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor norms = norms_in.contiguous();
  const at::Tensor src_pos = src_pos_in.contiguous();
  const at::Tensor dst_pos = dst_pos_in.contiguous();
  const int64_t batch = scores.size(0), num_src = scores.size(1), num_dst = scores.size(2);
  TORCH_CHECK(norms.scalar_type() == at::kFloat && norms.numel() == batch * num_src,
              "window_groups: norms must be a B×S float32 tensor");
  TORCH_CHECK(src_pos.scalar_type() == at::kLong && src_pos.numel() == num_src && dst_pos.scalar_type() == at::kLong &&
                  dst_pos.numel() == num_dst,
              "window_groups: src_pos and dst_pos must be S and D int64 tensors");
  TORCH_CHECK(num_dst >= 1 && r >= 0 && r <= num_src && p >= 0 && p + num_src + num_dst == n,
              "window_groups: bad token counts");
  for (const at::Tensor* positions : {&src_pos, &dst_pos}) {
    const int64_t* data = positions->data_ptr<int64_t>();
    for (int64_t i = 0; i < positions->numel(); ++i)
      TORCH_CHECK(data[i] >= p && data[i] < n, "window_groups: a source or destination position is out of range");
  }
  const int64_t kept = num_src - r;
  const int64_t first_dst = p + kept;
  const int64_t m_count = first_dst + num_dst;
  const auto long_options = scores.options().dtype(at::kLong);
  at::Tensor slot = at::empty({batch, n}, long_options);
  at::Tensor rep = at::empty({batch, m_count}, long_options);
  at::Tensor merged_pos = at::empty({batch, r}, long_options);
  at::Tensor into = at::empty({batch, r}, long_options);
  at::Tensor size = at::empty({batch, m_count, 1}, scores.options());
  const float* score_data = scores.data_ptr<float>();
  const float* norm_data = norms.data_ptr<float>();
  const int64_t* src_data = src_pos.data_ptr<int64_t>();
  const int64_t* dst_data = dst_pos.data_ptr<int64_t>();
  int64_t* slot_data = slot.data_ptr<int64_t>();
  int64_t* rep_data = rep.data_ptr<int64_t>();
  int64_t* merged_data = merged_pos.data_ptr<int64_t>();
  int64_t* into_data = into.data_ptr<int64_t>();
  float* size_data = size.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> best(num_src);
    std::vector<int64_t> best_dst(num_src), order(num_src);
    for (int64_t img = begin; img < end; ++img) {
      for (int64_t s = 0; s < num_src; ++s) {
        const float* row = score_data + (img * num_src + s) * num_dst;
        best_dst[s] = tokenreduce::first_argmax(row, num_dst);
        best[s] = row[best_dst[s]] / std::max(norm_data[img * num_src + s], tokenreduce::kNormEps);
      }
      std::iota(order.begin(), order.end(), 0);
      // descending; a NaN ranks first, as in torch's sort
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        const bool nan_a = std::isnan(best[a]), nan_b = std::isnan(best[b]);
        return nan_a ? !nan_b : (!nan_b && best[a] > best[b]);
      });
      int64_t* img_slot = slot_data + img * n;
      int64_t* img_rep = rep_data + img * m_count;
      float* img_size = size_data + img * m_count;
      for (int64_t i = 0; i < p; ++i) {
        img_slot[i] = i;
        img_rep[i] = i;
      }
      std::fill(img_size, img_size + m_count, 1.f);
      for (int64_t j = 0; j < num_dst; ++j) {
        img_rep[first_dst + j] = dst_data[j];
        img_slot[dst_data[j]] = first_dst + j;
      }
      for (int64_t k = 0; k < r; ++k) {
        const int64_t s = order[k];
        const int64_t group = first_dst + best_dst[s];
        merged_data[img * r + k] = src_data[s];
        into_data[img * r + k] = group;
        img_slot[src_data[s]] = group;
        img_size[group] += 1.f;
      }
      for (int64_t k = 0; k < kept; ++k) {
        const int64_t s = order[r + k];
        img_rep[p + k] = src_data[s];
        img_slot[src_data[s]] = p + k;
      }
    }
  });
  return {slot, rep, merged_pos, into, size};
}
