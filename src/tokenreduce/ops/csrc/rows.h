// Row helpers shared by the fused CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tokenreduce {

// Lower clamp of a row norm before dividing by it (tokenreduce.ops.similarity.NORM_EPS).
constexpr float kNormEps = 1e-6f;

// Writes row / max(|row|, eps) (dim floats) to `out`: tokenreduce.ops.similarity.unit_rows for one row.
inline void normalise(const float* row, int64_t dim, float* out) {
  float sum_sq = 0.f;
  for (int64_t d = 0; d < dim; ++d) sum_sq += row[d] * row[d];
  const float denom = std::max(std::sqrt(sum_sq), kNormEps);
  for (int64_t d = 0; d < dim; ++d) out[d] = row[d] / denom;
}

// Index of the first maximum of row[0..n) (n >= 1); a NaN wins, as in torch.argmax.
inline int64_t first_argmax(const float* row, int64_t n) {
  // The maximum over 16 lanes (a branch-free loop the compiler vectorises), then its first position: the
  // same index as the sequential scan below, which runs where a NaN is present or the row is short.
  constexpr int64_t kLanes = 16;
  if (n >= 2 * kLanes) {
    float lane[kLanes];
    int unordered[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) {
      lane[k] = row[k];
      unordered[k] = row[k] != row[k];
    }
    int64_t j = kLanes;
    for (; j + kLanes <= n; j += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const float v = row[j + k];
        lane[k] = v > lane[k] ? v : lane[k];
        unordered[k] |= v != v;
      }
    }
    float best = lane[0];
    int any_nan = unordered[0];
    for (int64_t k = 1; k < kLanes; ++k) {
      best = lane[k] > best ? lane[k] : best;
      any_nan |= unordered[k];
    }
    for (; j < n; ++j) {
      best = row[j] > best ? row[j] : best;
      any_nan |= row[j] != row[j];
    }
    if (!any_nan) {
      int64_t first = 0;
      while (row[first] != best) ++first;
      return first;
    }
  }
  int64_t best = 0;
  float best_value = row[0];
  for (int64_t j = 1; j < n && !std::isnan(best_value); ++j) {
    if (std::isnan(row[j]) || row[j] > best_value) {
      best_value = row[j];
      best = j;
    }
  }
  return best;
}

}  // namespace tokenreduce
