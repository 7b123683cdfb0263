// Row helpers shared by the fused CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tokenreduce {

// Lower clamp of a row norm before dividing by it (tokenreduce.ops.similarity.NORM_EPS).
constexpr float kNormEps = 1e-6f;

// The sum of squares of dim floats, in 8 independent lanes summed pairwise at the end, so that the compiler
// vectorises it; the order is fixed by dim alone.
inline float sum_of_squares(const float* __restrict__ row, int64_t dim) {
  constexpr int64_t kLanes = 8;
  float lane[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lane[k] += row[d + k] * row[d + k];
  }
  for (int64_t k = 0; k < kLanes && d + k < dim; ++k) lane[k] += row[d + k] * row[d + k];
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

// Writes row / max(|row|, eps) (dim floats) to `out`: tokenreduce.ops.similarity.unit_rows for one row (the same
// values to rounding).
inline void normalise(const float* __restrict__ row, int64_t dim, float* __restrict__ out) {
  const float denom = std::max(std::sqrt(sum_of_squares(row, dim)), kNormEps);
  for (int64_t d = 0; d < dim; ++d) out[d] = row[d] / denom;
}

// Writes the mean of `heads` >= 2 rows of dim floats (head h at row + h * head_stride) to `out`, as
// tokenreduce.ops.gather.head_mean: the heads added in order, then one division by their count.
inline void head_mean_row(const float* __restrict__ row, int64_t heads, int64_t head_stride, int64_t dim,
                          float* __restrict__ out) {
  for (int64_t d = 0; d < dim; ++d) out[d] = row[d] + row[head_stride + d];
  for (int64_t h = 2; h < heads; ++h) {
    const float* head_row = row + h * head_stride;
    for (int64_t d = 0; d < dim; ++d) out[d] += head_row[d];
  }
  const float count = static_cast<float>(heads);
  for (int64_t d = 0; d < dim; ++d) out[d] /= count;
}

// Unit rows (`normalise`) of `count` tokens first, first + 2, ... of one image's metric, dim floats each, written
// one after another to `out`.  The metric's token t, head h starts at image + t * token_stride + h * head_stride;
// with heads > 1 the heads are averaged first (`head_mean_row`, into `scratch`, dim floats).
inline void unit_rows_every_other(const float* image, int64_t token_stride, int64_t heads, int64_t head_stride,
                                  int64_t dim, int64_t first, int64_t count, float* scratch, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const float* row = image + (first + 2 * i) * token_stride;
    if (heads > 1) {
      head_mean_row(row, heads, head_stride, dim, scratch);
      row = scratch;
    }
    normalise(row, dim, out + i * dim);
  }
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
